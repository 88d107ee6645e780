"""LoRA (TRL's ModelConfig --use_peft) with BuPO: while internal only adapters of layers <= k train, then all; the
saved adapter loads with peft alone. Tiny offline model (trainer level) and the bundled model (``bupo train``)."""

from __future__ import annotations

import json
from pathlib import Path

import peft  # the peft extra is part of the dev extra: a missing peft fails here, it is not skipped
import pytest
import torch
from transformers import TrainerCallback

from support.training import make_model, make_trainer

pytestmark = [pytest.mark.xdist_group("training")]



def _lora_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "lora_" in name and "layers" in parts else None


class _Snap(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kw):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.after[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_internal_phase_trains_only_adapters_up_to_k_then_all(tmp_path):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    # k = 1 of 4 layers, internal for 2 rollout steps (= 2 optimizer steps), then 1 full step
    tr = make_trainer(tmp_path, model=make_model(), internal_steps=2, max_steps=3, weight_decay=0.1, probe_every=1,
                      trainer_kw={"peft_config": cfg})
    model = tr.accelerator.unwrap_model(tr.model)
    assert isinstance(model, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert {_lora_layer(n) for n in before} == {0, 1, 2, 3}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # base frozen
    snap = _Snap()
    snap.trainer = tr
    tr.add_callback(snap)
    tr.train()

    low = [n for n in before if _lora_layer(n) <= 1]
    high = [n for n in before if _lora_layer(n) > 1]
    for step in (1, 2):
        assert [n for n in high if not torch.equal(snap.after[step][n], before[n])] == [], f"step {step}"
        # lora_A gets a gradient only once lora_B has left zero, so check B of every adapter and A by step 2
        moved = {n for n in low if not torch.equal(snap.after[step][n], before[n])}
        assert {n for n in low if "lora_B" in n} <= moved, f"step {step}: {set(low) - moved}"
    assert set(low) <= {n for n in low if not torch.equal(snap.after[2][n], before[n])}
    full_moved = {n for n in high if not torch.equal(snap.after[3][n], snap.after[2][n])}
    assert {n for n in high if "lora_B" in n} <= full_moved  # the switch: every adapter trains
    phases = [h["bupo/phase"] for h in tr.state.log_history if "bupo/phase" in h]
    assert phases == [1.0, 1.0, 0.0]
    assert any(k.startswith("bupo/layer_entropy/L") for h in tr.state.log_history for k in h)  # probe on the base


def test_bupo_train_with_lora_flags_saves_an_adapter_peft_loads(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bupo.cli import main
    from bupo.zoo import bundled_model_path

    out = tmp_path / "lora"
    base_path = bundled_model_path()
    # every step internal at k = 3 (of 8 layers): adapters above 3 must be saved as initialised (lora_B = 0)
    rc = main(["train", "--model", str(base_path), "--algo", "bupo", "--internal-layer", "3", "--internal-steps", "9",
               "--out", str(out), "--eval-data", "none", "--max_steps", "4", "--per_device_train_batch_size", "16",
               "--num_generations", "8", "--max_completion_length", "64", "--learning_rate", "1e-3",
               "--save_strategy", "no", "--probe_every", "0", "--use_peft", "true", "--lora_r", "4",
               "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules", "q_proj", "v_proj"])
    assert rc == 0
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["peft"] == "lora" and summary["weights_dtype"] == "float32"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    state = load_file(str(out / "adapter_model.safetensors"))
    b_by_layer: dict[int, float] = {}
    for n, t in state.items():
        if "lora_B" in n:
            b_by_layer[_lora_layer(n)] = max(b_by_layer.get(_lora_layer(n), 0.0), t.abs().max().item())
    assert sorted(b_by_layer) == list(range(8))
    assert all(b_by_layer[i] == 0.0 for i in range(4, 8)), b_by_layer
    assert all(b_by_layer[i] > 0.0 for i in range(4)), b_by_layer

    # loads with peft outside bupo, on a freshly loaded base, and changes the model's outputs
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = torch.tensor([[5, 17, 9, 33, 12]])
    with torch.no_grad():
        ref = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out))
        got = tuned(ids).logits
    assert not torch.allclose(got, ref)
    assert Path(out / "tokenizer_config.json").is_file()
