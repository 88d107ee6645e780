"""GRPO and BuPO both improve the bundled model's held-out accuracy in a short ``bupo train`` run (fixed seed).

Each run: 6 rollout steps of 64 completions (8 prompts x 8), 2 optimizer steps per rollout, lr 2e-4, completions up to
64 tokens; BuPO takes k from ``--internal-layer auto`` (a short analysis of the model) and s_inter = 2. Accuracy is
Avg@4 (= pass@1) on 100 held-out problems of the bundled task, measured by the in-training evaluation before and after.
Measured on the 2-core CPU (1 thread): GRPO 0.435 -> 0.610, BuPO 0.435 -> 0.510. The asserted margins are far below
that; the model card's GRPO proof (40 steps, +35 points pass@1) shows how much GRPO can gain.

``BUPO_TEST_MODEL`` may point at another build of the bundled model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bupo.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("training")]

SHORT = ["--max_steps", "12", "--per_device_train_batch_size", "32", "--steps_per_generation", "2",
         "--learning_rate", "2e-4", "--max_completion_length", "64", "--eval_rows", "100", "--eval_samples", "4",
         "--save_strategy", "no", "--logging_steps", "2", "--probe_every", "2", "--seed", "0"]


def _model() -> Path:
    if os.environ.get("BUPO_TEST_MODEL"):
        return Path(os.environ["BUPO_TEST_MODEL"])
    from bupo.zoo import bundled_model_path

    return bundled_model_path()


def _gain(out: Path) -> tuple[float, float, dict]:
    summary = json.loads((out / "bupo_run.json").read_text())
    first, last = summary["evals"][0], summary["evals"][-1]
    assert first["step"] == 0 and last["step"] == 12
    return first["eval/avg"], last["eval/avg"], summary


def test_grpo_and_bupo_improve_held_out_accuracy(tmp_path):
    model = _model()
    card_gain = None
    proof = model / "grpo_proof.json"
    if proof.is_file():  # the card's GRPO proof: pass@1 gain in points after its (longer) run
        card_gain = json.loads(proof.read_text()).get("pass@1_gain_points")
    margin = 0.05 if card_gain is None else min(0.05, 0.25 * card_gain / 100)
    assert margin > 0, f"the model card's GRPO proof shows no gain ({card_gain} points)"

    assert main(["train", "--model", str(model), "--algo", "grpo", "--out", str(tmp_path / "grpo"), *SHORT]) == 0
    before, after, _ = _gain(tmp_path / "grpo")
    assert after - before >= margin, f"GRPO: {before:.3f} -> {after:.3f} (margin {margin:.3f})"

    assert main(["train", "--model", str(model), "--algo", "bupo", "--internal-layer", "auto",
                 "--internal-steps", "2", "--out", str(tmp_path / "bupo"), *SHORT]) == 0
    b_before, b_after, summary = _gain(tmp_path / "bupo")
    assert b_before == before  # same seed, same initial model, same held-out samples
    assert b_after - b_before >= 0.6 * margin, f"BuPO: {b_before:.3f} -> {b_after:.3f} (margin {0.6 * margin:.3f})"
    assert "analysis" in summary["internal_layer_source"] and (tmp_path / "bupo" / "analysis" / "summary.json").exists()
    history = json.loads((tmp_path / "bupo" / "log_history.json").read_text())
    assert [h["bupo/phase"] for h in history if "bupo/phase" in h] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
