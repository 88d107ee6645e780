"""The ``bupo train`` console: a bar per run, switch and end lines, raw dicts only with --verbose."""

from __future__ import annotations

import json

import pytest

from bupo.cli import main
from support.training import TINY, char_tokenizer, make_model, toy_rows

pytestmark = pytest.mark.xdist_group("training")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("console")
    make_model().save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16)))
    return d


def _run(ws, out, *extra):
    # 3 rollout steps of 2 optimizer steps: rollout step 1 internal (k=1), 2-3 full
    return main(["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--eval-data", "none",
                 "--out", str(out), *TINY, "--internal-layer", "1", "--internal-steps", "1", "--max_steps", "6",
                 "--logging_steps", "1", "--save_strategy", "no", *extra])


def test_console_shows_a_bar_the_switch_and_the_end_without_raw_dicts(ws, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the bar is redrawn in place
    assert _run(ws, tmp_path / "run") == 0
    out = capsys.readouterr().out
    print(out)
    assert "\r" in out
    bar = [seg for seg in out.replace("\r", "\n").splitlines() if seg.startswith("rollout ")]
    assert bar and bar[-1].startswith("rollout 3/3 ")  # the bar's final state: rollout steps, not optimizer steps
    assert "full | reward " in bar[-1] and "H(pi^k) " in bar[-1] and " s/step" in bar[-1]
    assert any("internal k=1 |" in seg for seg in bar)
    last = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "reward" in h][-1]
    assert f"reward {last['reward']:.3f} " in bar[-1] and f"H(pi) {last['bupo/entropy_full']:.3f} " in bar[-1]
    switch = [ln for ln in out.splitlines() if "internal k=1 -> full" in ln]
    assert len(switch) == 1 and switch[0].startswith("bupo: rollout step 2:") and "fixed internal_steps = 1" in switch[0]
    done = [ln for ln in out.splitlines() if ln.startswith("bupo: done:")]
    assert len(done) == 1 and "3 rollout steps (6 optimizer steps)" in done[0]
    assert "k=1 (paper layer 2), internal rollout steps 1..1" in done[0]
    assert "{'loss'" not in out and "'reward'" not in out and "bupo/entropy_full" not in out  # no raw TRL dicts


def test_into_a_log_the_progress_is_one_line_per_rollout_step(ws, tmp_path, capsys):
    assert _run(ws, tmp_path / "run") == 0  # captured stdout is not a terminal, like a log file or CI
    out = capsys.readouterr().out
    assert "\r" not in out  # no redraws in the log
    lines = [ln for ln in out.splitlines() if ln.startswith("rollout ")]
    assert [ln.split(" [")[0] for ln in lines] == ["rollout 1/3", "rollout 2/3", "rollout 3/3"], out
    assert "internal k=1 |" in lines[0] and all("full | reward " in ln for ln in lines[1:])
    logged = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "reward" in h]
    # each rollout step's line carries the last reward logged by its end (2 optimizer steps per rollout step)
    want = [f"reward {[h for h in logged if h['step'] <= 2 * r][-1]['reward']:.3f} " for r in (1, 2, 3)]
    assert want == [ln.split("| ")[1].split("|")[0] for ln in lines]
    assert out.index("internal k=1 -> full") > out.index("rollout 1/3") and out.index("bupo: done:") > out.index(
        "rollout 3/3")


def test_verbose_prints_the_raw_dicts(ws, tmp_path, capsys):
    assert _run(ws, tmp_path / "run", "--verbose") == 0
    out = capsys.readouterr().out
    assert "'reward'" in out and "'bupo/entropy_full'" in out  # TRL's PrinterCallback dicts
    assert not any(seg.startswith("rollout ") for seg in out.replace("\r", "\n").splitlines())
    assert sum("internal k=1 -> full" in ln for ln in out.splitlines()) == 1  # the summary lines stay
    assert sum(ln.startswith("bupo: done:") for ln in out.splitlines()) == 1


def test_grpo_and_the_adaptive_switch_lines(ws, tmp_path, capsys):
    assert main(["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--eval-data", "none",
                 "--out", str(tmp_path / "g"), *TINY, "--algo", "grpo", "--max_steps", "4",
                 "--save_strategy", "no"]) == 0
    out = capsys.readouterr().out
    assert not any("-> full" in ln for ln in out.splitlines())  # GRPO has no phase switch
    assert any(ln.startswith("bupo: done: 2 rollout steps") and "GRPO (full policy)" in ln for ln in out.splitlines())
    # the adaptive switch (internal_steps auto) with a cap of 1: the switch line carries the rule's reason
    assert main(["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--eval-data", "none",
                 "--out", str(tmp_path / "a"), *TINY, "--internal-layer", "1", "--internal-steps", "auto",
                 "--internal-steps-max", "1", "--max_steps", "4", "--save_strategy", "no"]) == 0
    out = capsys.readouterr().out
    switch = [ln for ln in out.splitlines() if "internal k=1 -> full" in ln]
    assert len(switch) == 1 and "cap reached: 1 internal rollout steps" in switch[0], out


def test_the_auto_layer_analysis_shows_its_progress(tmp_path, capsys):
    import torch

    from bupo.training.run import resolve_internal_layer

    try:
        resolve_internal_layer("auto", model=make_model(), tokenizer=char_tokenizer(), model_path=None,
                               output_dir=str(tmp_path), analysis=None, rows=toy_rows(2), template="chat", samples=2,
                               max_new_tokens=4, device=torch.device("cpu"))
    except ValueError as exc:  # random weights may have no usable boundary; the analysis ran before that
        assert "no usable boundary" in str(exc)
    err = capsys.readouterr().err
    assert "analyze" in err and "2/2" in err, err  # tqdm's bar of the measured responses, final state
