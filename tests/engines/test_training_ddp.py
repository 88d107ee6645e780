"""2-process DDP on CPU (gloo, torchrun): both BuPO phases run; upper layers stay bitwise frozen while internal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("training")]

TESTS = Path(__file__).parents[1]  # tests/, where support/ lives

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from support.training import letter_reward, make_model, make_trainer

    out = sys.argv[1]
    model = make_model(tie=True)
    init = {{n: p.detach().clone() for n, p in model.named_parameters()}}
    upper = [n for n in init if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))]
    lower = [n for n in init if n.startswith(("model.layers.0.", "model.embed_tokens."))]
    record = {{"phase": {{}}, "upper_same": {{}}, "lower_same": {{}}}}

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            params = dict(tr.accelerator.unwrap_model(tr.model).named_parameters())
            s = state.global_step
            record["upper_same"][s] = all(torch.equal(params[n].detach(), init[n]) for n in upper)
            record["lower_same"][s] = all(torch.equal(params[n].detach(), init[n]) for n in lower)
            record["phase"][s] = tr.bupo_internal

    RANK = int(os.environ.get("RANK", 0))

    def solved(completions, **kw):  # "correct" (1.0) at a rank-dependent rate: 1/2 on rank 0, 1/4 on rank 1
        return [1.0 if i % (2 + 2 * RANK) == 0 else 0.0 for i in range(len(completions))]

    tr = make_trainer(out, model=model, reward=[solved, letter_reward], internal_steps=2, max_steps=4,
                      weight_decay=0.1, probe_every=2, per_device_train_batch_size=4, num_generations=4)
    tr.add_callback(Check())
    tr.train()
    record["world_size"] = tr.accelerator.num_processes
    record["find_unused"] = tr.args.ddp_find_unused_parameters
    record["wrapped"] = type(tr.model_wrapped).__name__
    record["logged_phase"] = [h["bupo/phase"] for h in tr.state.log_history if "bupo/phase" in h]
    record["probe_keys"] = sorted(k for h in tr.state.log_history for k in h if k.startswith("bupo/layer_entropy"))
    logs = [h for h in tr.state.log_history if "bupo/phase" in h]
    record["accuracy"] = [h["bupo/accuracy"] for h in logs]
    record["entropy_pairs"] = [(h["entropy"], h["bupo/entropy_internal" if h["bupo/phase"] else "bupo/entropy_full"])
                               for h in logs]
    record["counters"] = list(tr.reward_funcs[0].counters())  # this rank's (completions, correct, errors, timeouts)
    # the weights are identical on both ranks (DDP all-reduced the gradients of the trained layers)
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    gathered = tr.accelerator.gather(flat.unsqueeze(0))
    record["ranks_agree"] = bool(torch.equal(gathered[0], gathered[-1]))
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump(record, f)
    # results are on disk: leave without destructors. Tearing down the DDP reducer / gloo process group at exit
    # can abort ("terminate called without an active exception") or deadlock on torch 2.13 CPU.
    tr.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def test_two_process_ddp_runs_both_phases(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rec["world_size"] == 2 and rec["find_unused"] is True
        assert rec["wrapped"] == "DistributedDataParallel"
        assert rec["phase"] == {"1": True, "2": True, "3": False, "4": False}
        assert rec["upper_same"] == {"1": True, "2": True, "3": False, "4": False}
        assert rec["lower_same"] == {"1": False, "2": False, "3": False, "4": False}
        assert rec["ranks_agree"]
        if rank == 0:
            assert rec["logged_phase"] == [1.0, 1.0, 0.0, 0.0]
            assert "bupo/layer_entropy/final" in rec["probe_keys"]
            # bupo/entropy_{phase} is TRL's globally reduced loss-pass entropy
            assert all(e == pytest.approx(b, rel=1e-6) for e, b in rec["entropy_pairs"])
    # accuracy per rollout is over both ranks' completions: with equal batches its mean is the global rate
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    completions = sum(r["counters"][0] for r in recs)
    correct = sum(r["counters"][1] for r in recs)
    assert recs[0]["counters"][0] == recs[1]["counters"][0] > 0
    assert recs[0]["counters"][1] != recs[1]["counters"][1]  # local rates differ: a local-only count would show
    assert sum(recs[0]["accuracy"]) / len(recs[0]["accuracy"]) == pytest.approx(correct / completions)
