"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo, DeepSpeed's CPU accelerator): bupo's own reads of partitioned weights.

Needs ``deepspeed`` (in the dev extra, so CI runs it; ``pip install -e '.[deepspeed]'`` elsewhere).
Runs DeepSpeed directly, not through ``accelerate launch``: accelerate never enables DeepSpeed for CPU processes
(docs/training.md, "DeepSpeed on the CPU"). The shared-memory all-reduce op, which DeepSpeed would JIT-compile at
``init_distributed`` (minutes; the earlier "hang"), is switched off: collectives go through gloo.

Checked on a model partitioned in place (``zero.Init(module=...)``, what ``zero3_init_flag`` does at load time):
the pre-flight health check, which runs before any engine exists (it crashed with "'weight' must be 2-D"), equals
the unsharded model's; under the engine, the internal policy's log-probs (truncated forward, and TRL's fused head),
and projections made outside any forward (lm_head's and the final norm's partitions are empty there) equal the
unsharded reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("training"),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="deepspeed is not installed (pip install -e '.[deepspeed]')")]

ROOT = Path(__file__).resolve().parents[2]


def _worker(out: str) -> None:
    import deepspeed
    import deepspeed.ops
    import torch
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig
    from trl.trainer.utils import add_fused_lm_head

    from bupo.analysis.health import quick_health
    from bupo.internal import Projector, internal_policy, layer_logprobs
    from bupo.zoo import bundled_model_path
    from support.tiny_models import random_batch, tiny_model

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build: gloo collectives
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    ref, model = tiny_model("qwen3", layers=4), tiny_model("qwen3", layers=4)  # the same weights (seeded)
    add_fused_lm_head(ref)
    add_fused_lm_head(model)
    keep = HfDeepSpeedConfig(cfg)  # what the trainer sets up: TRL then gathers lm_head for its fused head
    deepspeed.zero.Init(module=model, config_dict_or_path=cfg)
    rec = {"partitioned": all(p.numel() == 0 for p in model.parameters()), "rank": int(os.environ["RANK"])}
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    prompts = ["What is 2 + 3?", "Name a prime number larger than ten."]
    got, want = quick_health(model, tok, prompts), quick_health(ref, tok, prompts)  # no engine yet
    rec["health"] = max(abs(a - b) for key in ("layer_entropy", "layer_logprob")
                        for a, b in zip(got[key], want[key], strict=True))
    rec["health_norm_gain"] = abs(got["final_norm_gain_rms"] - want["final_norm_gain_rms"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    ids, mask = random_batch(ref, batch=2, seq=12)
    k, module = 1, engine.module  # the engine's hooks sit on the modules: a forward of the module fetches
    with torch.no_grad():
        want_k = layer_logprobs(ref, ids, mask, layer=k)
        rec["layer_logprobs"] = float((layer_logprobs(module, ids, mask, layer=k) - want_k).abs().max())
        with internal_policy(module, k):
            fused = engine(input_ids=ids, attention_mask=mask, labels=ids.clone(), fused_lm_head=True).log_probs
        rec["fused_internal_logprobs"] = float((fused - want_k).abs().max())
        h = torch.randn(5, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
        rec["projector_outside_forward"] = float((Projector(module, "final_norm").logits(h)
                                                  - Projector(ref, "final_norm").logits(h)).abs().max())
    del keep
    with open(os.path.join(out, f"zero3-rank{rec['rank']}.json"), "w") as f:
        json.dump(rec, f)


def test_zero3_partitioned_reads_equal_unsharded(tmp_path):
    from support.launchers import launcher_env, run_group

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), str(tmp_path)]
    proc = run_group(cmd, env=launcher_env(DS_ACCELERATOR="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in (0, 1):
        rec = json.loads((tmp_path / f"zero3-rank{r}.json").read_text())
        assert rec["partitioned"]
        for key in ("health", "health_norm_gain", "layer_logprobs", "fused_internal_logprobs",
                    "projector_outside_forward"):
            assert rec[key] < 1e-5, (key, rec[key])


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without destructors: tearing down gloo process groups at exit can abort on torch 2.13 CPU
