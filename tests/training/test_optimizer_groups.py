"""What BuPO's internal phase does not train takes no optimizer step, whatever gradients the launcher hands over.

DDP and FSDP2 give the layers above k (and the final norm, projection raw) None gradients while internal; DeepSpeed
ZeRO-3 gives them zeros. The zeros are injected here the way ZeRO-3 makes them (a gradient for every trainable
parameter, zeros where none flowed), through the trainer and through a stand-in for ZeRO-3's optimizer wrapper (one
flat fp32 partition per param group, inside the group only while it steps). Expected under every launcher: no weight
decay and no optimizer state while internal, and the first update after the switch equals a fresh torch AdamW's
step 1. Tiny random-init Qwen3 models (4 layers, k = 1), offline.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from bupo.internal import internal_policy
from bupo.training.optim import LEVEL, hold_while_internal, layer_levels, split_groups
from bupo.training.trainer import BuPOTrainer
from support.training import make_model, make_trainer

pytestmark = pytest.mark.xdist_group("training")
TESTS = Path(__file__).parents[1]  # tests/, where support/ lives
UPPER = ("model.layers.2.", "model.layers.3.", "model.norm.")  # above k = 1, and the final norm (projection raw)


class Unsplit(BuPOTrainer):
    """BuPO with TRL's optimizer as it comes: what the launchers' own gradients alone give."""

    def create_optimizer(self, model=None):
        return GRPOTrainer.create_optimizer(self, model)


def fresh_adamw_step(value: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """``value`` after step 1 of a new torch AdamW with ``group``'s hyperparameters."""
    p = torch.nn.Parameter(value.clone())
    p.grad = grad.clone()
    accepted = inspect.signature(torch.optim.AdamW).parameters
    torch.optim.AdamW([p], **{k: v for k, v in group.items() if k in accepted and k != "params"}).step()
    return p.detach()


def group_names(trainer) -> list[tuple[int | None, float, set[str]]]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [(g.get(LEVEL), g["weight_decay"], {names[id(p)] for p in g["params"]})
            for g in trainer.optimizer.param_groups]


def test_groups_split_at_k_and_grpo_keeps_trls_groups(tmp_path):
    tr = make_trainer(tmp_path, internal_steps=2)
    tr.create_optimizer()
    groups = group_names(tr)
    assert [(lvl, wd) for lvl, wd, _ in groups] == [(None, 0.0), (None, 0.0), (2, 0.0), (2, 0.0)]
    trained = set().union(*(n for lvl, _, n in groups if lvl is None))
    held = set().union(*(n for lvl, _, n in groups if lvl is not None))
    assert held and all(n.startswith(UPPER) for n in held)
    assert trained == {n for n, _ in tr.model.named_parameters()} - held
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"} <= trained
    # TRL's decay / no-decay split survives inside each band
    wd = make_trainer(tmp_path / "wd", internal_steps=2, weight_decay=0.1)
    wd.create_optimizer()
    assert [(lvl, w) for lvl, w, _ in group_names(wd)] == [(None, 0.1), (None, 0.0), (2, 0.1), (2, 0.0)]
    assert all("norm" in n for lvl, w, names in group_names(wd) if w == 0.0 for n in names)
    # final_norm projection: pi^k runs the final norm, so it trains while internal
    fn = make_trainer(tmp_path / "fn", internal_steps=2, internal_projection="final_norm")
    fn.create_optimizer()
    assert "model.norm.weight" in set().union(*(n for lvl, _, n in group_names(fn) if lvl is None))
    # a schedule: one band per stretch between its layers
    sched = make_trainer(tmp_path / "s", internal_schedule="0:1,2:2")
    sched.create_optimizer()
    bands = {}
    for lvl, _, names in group_names(sched):
        bands.setdefault(lvl, set()).update(n.split(".")[2] if n.startswith("model.layers.") else n for n in names)
    assert bands == {None: {"model.embed_tokens.weight", "0", "lm_head.weight"}, 1: {"1", "2"},
                     3: {"3", "model.norm.weight"}}
    # GRPO: TRL's groups, untouched
    grpo = make_trainer(tmp_path / "g", internal_steps=0, weight_decay=0.1)
    grpo.create_optimizer()
    plain = Unsplit(model=make_model(), reward_funcs=grpo.reward_funcs, args=grpo.args,
                    train_dataset=grpo.train_dataset, processing_class=grpo.processing_class)
    plain.create_optimizer()
    assert group_names(grpo) == group_names(plain) and len(group_names(grpo)) == 2


class Zero3Grads(TrainerCallback):
    """Injects ZeRO-3's zero gradients and records, per optimizer step, the upper parameters before and after, their
    gradients and group, and which of them hold optimizer state."""

    def __init__(self, trainer, inject: bool = True):
        self.trainer, self.inject = trainer, inject
        self.before, self.after, self.grads, self.groups, self.with_state = {}, {}, {}, {}, {}

    def upper(self):
        return {n: p for n, p in self.trainer.model.named_parameters() if n.startswith(UPPER)}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        step = state.global_step + 1
        for p in self.trainer.model.parameters():
            if self.inject and p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        ups = self.upper()
        self.before[step] = {n: p.detach().clone() for n, p in ups.items()}
        self.grads[step] = {n: None if p.grad is None else p.grad.clone() for n, p in ups.items()}
        where = {id(p): g for g in self.trainer.optimizer.param_groups for p in g["params"]}
        self.groups[step] = {n: dict(where[id(p)]) for n, p in ups.items()}

    def on_optimizer_step(self, args, state, control, **kw):
        step = state.global_step + 1
        opt = self.trainer.optimizer
        self.after[step] = {n: p.detach().clone() for n, p in self.upper().items()}
        self.with_state[step] = {n for n, p in self.upper().items() if len(opt.state.get(p, {})) > 0}


def run(tmp_path, cls=BuPOTrainer, inject=True, model=None):
    tr = make_trainer(tmp_path, trainer_cls=cls, model=model, internal_steps=2, max_steps=3, weight_decay=0.1,
                      probe_every=0, log_policy_entropies=False)
    spy = Zero3Grads(tr, inject)
    tr.add_callback(spy)
    tr.train()
    return tr, spy


def test_zero3_zero_gradients_take_no_step_while_internal_and_the_switch_is_adamw_step_1(tmp_path):
    tr, spy = run(tmp_path / "bupo")
    upper = list(spy.before[1])
    assert len(upper) == 2 * 11 + 1  # two Qwen3 layers of 11 tensors each + the final norm
    for step in (1, 2):  # internal: zero gradients came in, nothing moved, no state was kept
        assert all(torch.equal(spy.grads[step][n], torch.zeros_like(spy.before[1][n])) for n in upper)
        assert all(torch.equal(spy.after[step][n], spy.before[1][n]) for n in upper), f"moved in step {step}"
        assert spy.with_state[step] == set(), f"optimizer state kept in internal step {step}"
    assert any(spy.groups[1][n]["weight_decay"] == 0.1 for n in upper)  # weight decay was on, yet did not act
    # the switch: every upper parameter moves exactly as under a fresh AdamW (bias correction at t = 1)
    for n in upper:
        g = spy.grads[3][n]
        assert g.abs().sum() > 0, n
        expected = fresh_adamw_step(spy.before[3][n], g, spy.groups[3][n])
        assert torch.equal(spy.after[3][n], expected), (n, (spy.after[3][n] - expected).abs().max())
    assert spy.with_state[3] == set(upper)

    # the same injection with TRL's optimizer as it comes: the distortion this guards against
    _, bare = run(tmp_path / "bare", cls=Unsplit)
    decayed = [n for n in upper if not torch.equal(bare.after[2][n], bare.before[1][n])]
    assert decayed and all(spy.groups[1][n]["weight_decay"] == 0.1 for n in decayed)
    assert bare.with_state[2] == set(upper)  # AdamW counted two steps for parameters that did not train
    off = [n for n in upper if not torch.allclose(
        bare.after[3][n], fresh_adamw_step(bare.before[3][n], bare.grads[3][n], bare.groups[3][n]), atol=1e-6)]
    assert off, "the stale step count did not change the first full-phase update"


def test_without_zero_gradients_the_run_is_bitwise_what_it_was(tmp_path):
    """DDP / no launcher: the split groups and hooks change nothing - the same run, bitwise, as with TRL's optimizer."""
    split, spy = run(tmp_path / "split", inject=False, model=make_model())
    bare, bare_spy = run(tmp_path / "bare", cls=Unsplit, inject=False, model=make_model())
    for step in (1, 2):
        assert all(g is None for g in spy.grads[step].values())  # DDP's None gradients
        assert all(torch.equal(spy.after[step][n], spy.before[1][n]) for n in spy.before[1])
        assert spy.with_state[step] == set()
    a, b = dict(split.model.named_parameters()), dict(bare.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (split, bare)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


class Zero3Optimizer:
    """The part of DeepSpeed's ZeRO-3 optimizer that the hooks meet: per param group one flat fp32 partition with a
    gradient for every element (zeros where none flowed), put into the wrapped torch optimizer's group only while
    that group steps, then copied back into the model's parameters."""

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base
        self.params = [list(g["params"]) for g in base.param_groups]
        self.flat = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in ps]).float()) for ps in self.params]
        for g in base.param_groups:
            g["params"] = []

    def step(self) -> None:
        for i, (ps, flat) in enumerate(zip(self.params, self.flat, strict=True)):
            flat.grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in ps])
            self.base.param_groups[i]["params"] = [flat]
            self.base.step()
            self.base.param_groups[i]["params"] = []
            flat.grad = None
            with torch.no_grad():
                offset = 0
                for p in ps:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def zero_grad(self) -> None:
        for ps in self.params:
            for p in ps:
                p.grad = None


def test_zero3_style_flat_partitions_are_held_too():
    torch.manual_seed(0)
    model = make_model()
    k, internal = 1, {"now": True}
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    base = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": [p for n, p in model.named_parameters() if "norm" in n],
                               "weight_decay": 0.0}], lr=1e-2)
    split_groups(base, layer_levels(model, "raw"), [k])
    hold_while_internal(base, lambda: k if internal["now"] else None)
    held = [i for i, g in enumerate(base.param_groups) if LEVEL in g]
    assert held == [2, 3]
    opt = Zero3Optimizer(base)
    ids = torch.randint(3, 90, (2, 9))

    def loss():
        return model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()

    start = [f.detach().clone() for f in opt.flat]
    for _ in range(2):  # internal: pi^k only
        with internal_policy(model, k):
            loss().backward()
        opt.step()
        opt.zero_grad()
        for i in held:
            assert torch.equal(opt.flat[i], start[i]) and len(base.state.get(opt.flat[i], {})) == 0
    assert not torch.equal(opt.flat[0], start[0])  # the lower layers did train
    internal["now"] = False
    loss().backward()
    expected = {i: fresh_adamw_step(opt.flat[i].detach(), torch.cat([p.grad.reshape(-1) for p in opt.params[i]]),
                                    base.param_groups[i]) for i in held}
    opt.step()
    for i in held:
        assert torch.equal(opt.flat[i].detach(), expected[i])
        assert int(base.state[opt.flat[i]]["step"]) == 1


FSDP2_SCRIPT = textwrap.dedent(
    """
    import inspect, json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from bupo.internal import internal_policy
    from bupo.training.optim import LEVEL, hold_while_internal, layer_levels, split_groups
    from support.training import make_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    k, internal = 1, {{"now": True}}
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    split_groups(base, layer_levels(model, "raw"), [k])
    hold_while_internal(base, lambda: k if internal["now"] else None)
    held = [p for g in base.param_groups if LEVEL in g for p in g["params"]]
    rec = {{"dtensor": all(isinstance(p, DTensor) for p in held), "n_held": len(held)}}
    start = [p.to_local().clone() for p in held]
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(rank))

    def loss():
        return model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()

    for _ in range(2):
        with internal_policy(model, k):
            loss().backward()
        rec.setdefault("none_grads", []).append(all(p.grad is None for p in held))
        for p in held:  # what ZeRO-3 would hand over instead
            p.grad = torch.zeros_like(p)
        base.step()
        base.zero_grad()
    rec["unchanged"] = all(torch.equal(p.to_local(), s) for p, s in zip(held, start))
    rec["no_state"] = all(len(base.state.get(p, {{}})) == 0 for p in held)
    internal["now"] = False
    loss().backward()
    groups = {{id(p): g for g in base.param_groups for p in g["params"]}}
    expected = []
    for p in held:
        q = torch.nn.Parameter(p.to_local().clone())
        q.grad = p.grad.to_local().clone()
        accepted = inspect.signature(torch.optim.AdamW).parameters
        torch.optim.AdamW([q], **{{k: v for k, v in groups[id(p)].items() if k in accepted and k != "params"}}).step()
        expected.append(q.detach())
    base.step()
    rec["fresh_step_1"] = all(torch.equal(p.to_local(), e) for p, e in zip(held, expected))
    rec["moved"] = all(not torch.equal(p.to_local(), s) for p, s in zip(held, start) if s.numel())
    with open(os.path.join(sys.argv[1], f"rank{{rank}}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_fsdp2_dtensor_shards_are_held_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "fsdp2_hold.py"
    script.write_text(FSDP2_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in (0, 1):
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rec == {"dtensor": True, "n_held": 23, "none_grads": [True, True], "unchanged": True,
                       "no_state": True, "fresh_step_1": True, "moved": True}, (r, rec)
