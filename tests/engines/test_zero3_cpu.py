"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo, DeepSpeed's CPU accelerator): bupo's own reads of partitioned weights.

Needs ``deepspeed`` (in the dev extra, so CI runs it; ``pip install -e '.[deepspeed]'`` elsewhere).
Runs DeepSpeed directly, not through ``accelerate launch``: accelerate never enables DeepSpeed for CPU processes
(docs/training.md, "DeepSpeed on the CPU"). The shared-memory all-reduce op, which DeepSpeed would JIT-compile at
``init_distributed`` (minutes; the earlier "hang"), is switched off: collectives go through gloo.

Checked on a model partitioned in place (``zero.Init(module=...)``, what ``zero3_init_flag`` does at load time):
the pre-flight health check, which runs before any engine exists (it crashed with "'weight' must be 2-D"), equals
the unsharded model's; under the engine, the internal policy's log-probs (truncated forward, and TRL's fused head),
and projections made outside any forward (lm_head's and the final norm's partitions are empty there) equal the
unsharded reference. The in-training evaluation's path: inside ``full_params`` with the trainer's accelerator each
rank generates its share of the requests alone, the completions equal the unsharded model's, and the engine trains
after it (DeepSpeed's hooks restored).
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
    # nothing persists gathered (DeepSpeed keeps parameters under 1e5 elements whole after their first use: all of
    # this tiny model's), so every read below meets partitioned weights
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
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
    rec.update(_evaluation_share(engine, ref, tok, rec["rank"]))
    weight = module.model.layers[0].mlp.down_proj.weight
    with deepspeed.zero.GatheredParameters([weight]):
        before = weight.detach().clone()
    loss = engine(input_ids=ids, attention_mask=mask, labels=ids.clone()).loss  # DeepSpeed's hooks are back
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters([weight]):
        moved = float((weight.detach() - before).abs().max())
    rec["trains_after_eval"] = bool(torch.isfinite(loss).item()) and moved > 0
    del keep
    with open(os.path.join(out, f"zero3-rank{rec['rank']}.json"), "w") as f:
        json.dump(rec, f)


def _evaluation_share(engine, ref, tok, rank: int) -> dict:
    """The in-training evaluation's path under ZeRO-3 (``bupo.training.eval_callback``): inside ``full_params`` with
    the trainer's accelerator (TRL's ``unwrap_model_for_generation``: weights gathered, DeepSpeed's hooks lifted) each
    rank generates its share of the requests alone; every rank gets all the completions, which equal the unsharded
    model's on the same requests (each request has its own seed)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from bupo.evaluation.backends import HFBackend, SamplingSettings
    from bupo.training.eval_callback import RankShares
    from bupo.training.gather import full_params

    def gather(obj: list) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return [x for part in out for x in part]

    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
                                  unwrap_model=lambda m: m.module)  # what TRL's unwrapping reads of accelerate's
    requests = [(f"Q{i}: what is {i} + {i}?", 1000 + i) for i in range(5)]
    settings = SamplingSettings(max_new_tokens=6)
    counted: list[int] = []
    with full_params(engine, accelerator) as model:
        inner = HFBackend(model, tok, batch_size=2)
        real = inner.generate
        inner.generate = lambda reqs, st, on_batch=None: (counted.append(len(reqs)), real(reqs, st, on_batch))[1]
        got = RankShares(inner, rank, 2, gather).generate(requests, settings)
    want = HFBackend(ref, tok, batch_size=2).generate(requests, settings)
    return {"eval_same_as_unsharded": [c.token_ids for c in got] == [c.token_ids for c in want],
            "eval_distinct": len({tuple(c.token_ids) for c in want}), "eval_requests": counted}


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
        assert rec["eval_same_as_unsharded"] and rec["eval_distinct"] > 1 and rec["trains_after_eval"]
    # 5 requests in blocks of 2 per rank: rank 0 generates 0, 2 then 4; rank 1 generates 1, 3 and nothing more
    assert [json.loads((tmp_path / f"zero3-rank{r}.json").read_text())["eval_requests"] for r in (0, 1)] == [[2, 1], [2]]


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without destructors: tearing down gloo process groups at exit can abort on torch 2.13 CPU
