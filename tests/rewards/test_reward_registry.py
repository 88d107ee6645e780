"""One reward registry: train, eval, reproduce and the Python API take the same names; ``bupo eval`` scores a trained
model with the reward its ``bupo_run.json`` records unless ``--reward`` says otherwise, and says which."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bupo.cli import build_parser
from bupo.cli import main as cli_main
from bupo.rewards import REWARD_NAMES, REWARDS, choose_reward, parse_rewards, recorded_reward


def test_registry_names_and_callables() -> None:
    assert REWARD_NAMES == ("boxed_exact", "math_verify", "final_number")
    assert REWARDS["final_number"]("so the answer is 12.", "12") == 1.0
    assert REWARDS["boxed_exact"]("so the answer is 12.", "12") == 0.0
    assert parse_rewards("boxed_exact, final_number") == ["boxed_exact", "final_number"]
    assert parse_rewards(["math_verify"]) == ["math_verify"]
    for bad, message in (("nope", "unknown reward 'nope'; accepted: boxed_exact, final_number, math_verify"),
                         (" , ", "at least one name"), ([1], "reward names are strings"), (3, "a name or a list")):
        with pytest.raises(ValueError, match=message):
            parse_rewards(bad)


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_every_command_accepts_every_name(name: str) -> None:
    parser = build_parser()
    assert parser.parse_args(["eval", "--reward", name]).reward == name
    from bupo.training.arguments import run_settings

    assert run_settings({"reward": name})[1].reward == name


def test_train_refuses_an_unknown_reward_before_loading(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["train", "--reward", "boxed_exact,nope", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'nope'" in err and err.count("\n") == 1


def test_recorded_reward(tmp_path: Path) -> None:
    assert recorded_reward(tmp_path) is None
    assert choose_reward(None, tmp_path) == ("boxed_exact", "the default, the paper's")
    (tmp_path / "bupo_run.json").write_text(json.dumps({"reward": "final_number,boxed_exact"}))
    assert recorded_reward(tmp_path) == "final_number"
    assert choose_reward(None, tmp_path)[0] == "final_number"
    assert choose_reward("math_verify", tmp_path) == ("math_verify", "--reward")
    (tmp_path / "bupo_run.json").write_text("{not json")
    assert recorded_reward(tmp_path) is None
    (tmp_path / "bupo_run.json").write_text(json.dumps({"reward": "retired_reward"}))
    assert recorded_reward(tmp_path) is None


def test_eval_scores_with_the_recorded_reward(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bupo.zoo import DEFAULT_MODEL

    model = tmp_path / "trained"
    shutil.copytree(DEFAULT_MODEL, model)
    (model / "bupo_run.json").write_text(json.dumps({"algo": "grpo", "reward": "final_number"}))
    base = ["eval", "--model", str(model), "--problems", "2", "--n", "2", "--k", "1", "--max-new-tokens", "16",
            "--no-progress"]
    assert cli_main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"scored with reward final_number (recorded in {model / 'bupo_run.json'})" in err
    assert json.loads((tmp_path / "a" / "results.json").read_text())["settings"]["reward"] == "final_number"
    assert cli_main([*base, "--reward", "boxed_exact", "--out", str(tmp_path / "b")]) == 0
    assert "scored with reward boxed_exact (--reward)" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "results.json").read_text())["settings"]["reward"] == "boxed_exact"
