"""``bupo train`` under a real launcher, instrumented (used by tests/test_training_launchers.py).

Run as ``accelerate launch --config_file CFG tests/launch_probe.py OUT train ...``: it adds one callback to
BuPOTrainer that records, on every rank, whether that rank's own parameter shards (FSDP2: DTensor local shards) of the
layers above k and the final norm are bitwise unchanged after the internal phase and moved after the switch, then
runs ``bupo.cli.main(["train", ...])`` unchanged. Writes OUT/probe-rank{r}.json.

ZeRO-3 shards are read from ``param.ds_tensor``. ``upper_within_decay`` allows what weight decay alone does to a
parameter with a zero (not None) gradient, as under ZeRO-3: |w - w0| <= steps x lr x wd x |w0| + one ulp.
``BUPO_PROBE_ALTERNATING_REWARD=1`` replaces the rewards by 0/1 alternating ones (random-init models never score),
so every group has non-zero advantages.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback

import bupo.training.trainer as trainer_mod
from bupo.cli import main


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition
        return p.ds_tensor.detach().clone()
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def _within_decay(now: torch.Tensor, init: torch.Tensor, steps: int, lr: float, wd: float) -> bool:
    ulp = torch.finfo(init.dtype).eps * init.abs().float()
    return bool(((now.float() - init.float()).abs() <= steps * lr * wd * init.abs().float() + ulp + 1e-30).all())


def alternating(completions, **kw):
    return [float(i % 2) for i in range(len(completions))]


class Probe(TrainerCallback):
    def __init__(self, trainer, out: str) -> None:
        self.trainer, self.out = trainer, out
        self.init: dict[str, torch.Tensor] = {}
        self.record: dict = {"steps": {}}

    def _groups(self):
        k = self.trainer.args.internal_layer
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        upper, lower = {}, {}
        for n, p in model.named_parameters():
            parts = n.split(".")
            if "layers" in parts:
                i = int(parts[parts.index("layers") + 1])
                (upper if i > k else lower)[n] = p
            elif n.endswith("model.norm.weight"):
                upper[n] = p
        return upper, lower

    def on_train_begin(self, args, state, control, **kw):
        upper, lower = self._groups()
        self.init = {n: _local(p) for n, p in {**upper, **lower}.items()}
        self.record["param_type"] = type(next(iter(upper.values()))).__name__
        self.record["wrapped"] = type(self.trainer.model_wrapped).__name__
        self.record["start_step"] = state.global_step

    def on_step_end(self, args, state, control, **kw):
        upper, lower = self._groups()
        same = lambda group: {n: torch.equal(_local(p), self.init[n]) for n, p in group.items()}  # noqa: E731
        u, lo = same(upper), same(lower)
        steps = state.global_step - self.record["start_step"]
        decay = all(_within_decay(_local(p), self.init[n], steps, args.learning_rate, args.weight_decay)
                    for n, p in upper.items())
        self.record["steps"][state.global_step] = {
            "internal": self.trainer.bupo_internal, "upper_same": all(u.values()), "lower_same": all(lo.values()),
            "upper_within_decay": decay, "n_upper": len(u), "n_lower": len(lo)}

    def on_train_end(self, args, state, control, **kw):
        self.record["world_size"] = self.trainer.accelerator.num_processes
        keys = ("loss", "reward", "bupo/phase", "bupo/accuracy", "entropy", "bupo/entropy_internal",
                "bupo/entropy_full", "bupo/layer_entropy/final")
        self.record["logs"] = [{k: h[k] for k in keys if k in h} for h in state.log_history if "bupo/phase" in h]
        self.record["global_step"] = state.global_step
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(self.out, f"probe-rank{rank}.json"), "w") as f:
            json.dump(self.record, f)


_init = trainer_mod.BuPOTrainer.__init__


def _patched_init(self, *a, **kw):
    _init(self, *a, **kw)
    self.add_callback(Probe(self, OUT))


if __name__ == "__main__":
    torch.set_num_threads(1)
    OUT = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    trainer_mod.BuPOTrainer.__init__ = _patched_init
    if os.environ.get("BUPO_PROBE_ALTERNATING_REWARD") == "1":
        import bupo.rewards

        bupo.rewards.make_reward_func = lambda name, **kw: alternating
    rc = main(sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without destructors: tearing down gloo process groups at exit can abort on torch 2.13 CPU
    os._exit(rc)
