"""fp32 master weights under bf16 mixed precision: ``bupo train --bf16 true`` on the CPU (bf16
autocast) at the paper's lr 1e-6 moves >= 99% of the decoder-layer elements in 4 AdamW steps; explicitly asking for
bf16 weights warns and moves almost none (the updates round away: ~1e-6 against bf16's 2^-8 relative spacing)."""

from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file

from bupo.cli import main

pytestmark = [pytest.mark.xdist_group("training")]

ARGS = ["--algo", "grpo", "--eval-data", "none", "--max_steps", "4", "--bf16", "true", "--learning_rate", "1e-6",
        "--per_device_train_batch_size", "16", "--num_generations", "8", "--max_completion_length", "32",
        "--save_strategy", "no", "--probe_every", "0", "--logging_steps", "1"]


def _changed_fraction(base: dict, out) -> tuple[float, str]:
    new = load_file(str(out / "model.safetensors"))
    total = changed = 0
    for name, ref in base.items():
        if ".layers." in name:  # the decoder layers: every element gets a gradient in GRPO
            got = new[name]
            total += ref.numel()
            changed += (got != ref.to(got.dtype)).sum().item()
    return changed / total, str(next(iter(new.values())).dtype)


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, caplog):
    from bupo.zoo import bundled_model_path

    model = bundled_model_path()
    base = load_file(str(model / "model.safetensors"))
    assert main(["train", "--model", str(model), "--out", str(tmp_path / "fp32"), *ARGS]) == 0
    summary = json.loads((tmp_path / "fp32" / "bupo_run.json").read_text())
    assert summary["weights_dtype"] == "float32" and summary["mixed_precision"] == "bf16"
    history = json.loads((tmp_path / "fp32" / "log_history.json").read_text())
    assert sum(h.get("grad_norm", 0) > 0 for h in history) >= 2  # some steps had a gradient at all
    frac, dtype = _changed_fraction(base, tmp_path / "fp32")
    assert dtype == "torch.float32" and frac >= 0.99, frac

    # the reference: low-precision weights asked for explicitly -> a warning, and the updates round away
    with caplog.at_level(logging.WARNING, logger="bupo.training.model"):
        assert main(["train", "--model", str(model), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                     *ARGS]) == 0
    assert any("round away" in r.getMessage() for r in caplog.records)
    frac16, dtype16 = _changed_fraction(base, tmp_path / "bf16")
    assert dtype16 == "torch.bfloat16" and frac16 < 0.2, frac16
