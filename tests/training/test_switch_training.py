"""The adaptive switch and the progressive schedule inside BuPOTrainer: applied per rollout step, logged, resumed,
measured correctly, and decided alike on two gloo ranks.

Tiny random-init Qwen3 models (4 layers) and a character tokenizer, offline. The switch signals are checked against
an independent reference (an ordinary forward with ``output_hidden_states``); decisions are driven by scripted
log-prob traces where the test needs a switch at a known step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bupo.training.checkpointing import PROBE_FILE, SWITCH_FILE
from bupo.training.trainer import BuPOTrainer
from support.training import make_model, make_trainer

pytestmark = pytest.mark.xdist_group("training")
TESTS = Path(__file__).parents[1]  # tests/, where support/ lives


class Scripted(BuPOTrainer):
    """Real signals, but full_logp replaced by ``script[step]`` and a flat KL; records (optimizer step, internal, layer) per loss."""

    script: dict[int, float] = {}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.loss_log: list[tuple[int, bool, int | None]] = []

    def _bupo_signals(self, step, reward=None):
        sig = super()._bupo_signals(step, reward)
        return dataclasses.replace(sig, full_logp=self.script.get(step, -1.0), kl_internal_full=0.3)

    def _compute_loss(self, model, inputs):
        self.loss_log.append((self.state.global_step + 1, self.bupo_internal, self.bupo_layer))
        return super()._compute_loss(model, inputs)

    def by_step(self) -> dict[int, tuple[bool, int | None]]:
        return {s: (i, k if i else None) for s, i, k in self.loss_log}


def test_auto_switch_applies_the_rule_logs_it_and_resumes_in_the_full_phase(tmp_path):
    Scripted.script = {1: -1.0, 2: -1.01, 3: -1.2}  # drop 0.2 >= 0.05 at step 3
    common = dict(trainer_cls=Scripted, internal_steps="auto", internal_steps_max=10, save_strategy="steps",
                  save_steps=4, probe_every=0)
    first = make_trainer(tmp_path, max_steps=4, **common)  # one optimizer step per rollout step
    first.train()
    assert {s: i for s, (i, _) in first.by_step().items()} == {1: True, 2: True, 3: False, 4: False}
    sw = first.bupo_switch
    assert sw["mode"] == "auto" and sw["step"] == 3 and sw["internal_rollout_steps"] == 2
    assert "fell 0.200 nats/token" in sw["reason"]
    logs = [h for h in first.state.log_history if "bupo/rollout_step" in h]
    assert [h["bupo/phase"] for h in logs] == [1.0, 1.0, 0.0, 0.0]
    assert all("bupo/switch/kl_internal_full" in h and "bupo/switch/entropy_internal" in h for h in logs)
    assert [h.get("bupo/switch/switch_step") for h in logs] == [None, None, 3.0, None]
    state = json.loads((tmp_path / "checkpoint-4" / SWITCH_FILE).read_text())
    assert state["switch_step"] == 3 and len(state["trace"]) == 4

    # resumed after the switch: a fresh rule would stay internal on this flat trace, the restored one stays full
    Scripted.script = {}
    second = make_trainer(tmp_path, model=make_model(seed=5), max_steps=6, **common)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert second.by_step() == {5: (False, None), 6: (False, None)}
    assert second.bupo_switch["step"] == 3 and second.bupo_switch["reason"] == sw["reason"]
    assert len(second.bupo_switch["trace"]) == 6


def test_auto_resume_needs_the_switch_state(tmp_path):
    fixed = make_trainer(tmp_path, internal_steps=2, max_steps=2, save_strategy="steps", save_steps=2, probe_every=0)
    fixed.train()
    auto = make_trainer(tmp_path, internal_steps="auto", internal_steps_max=4, max_steps=4, probe_every=0)
    with pytest.raises(ValueError, match=f"no {SWITCH_FILE}"):
        auto.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_cap_ends_the_internal_phase(tmp_path):
    Scripted.script = {}
    tr = make_trainer(tmp_path, trainer_cls=Scripted, internal_steps="auto", internal_steps_max=2, max_steps=4,
                      probe_every=0)
    tr.train()
    assert {s: i for s, (i, _) in tr.by_step().items()} == {1: True, 2: True, 3: False, 4: False}
    assert tr.bupo_switch["step"] == 3 and tr.bupo_switch["reason"].startswith("cap reached: 2")


def test_switch_signals_match_an_independent_reference(tmp_path):
    tr = make_trainer(tmp_path, internal_steps="auto", internal_steps_max=4, max_steps=2, probe_every=0,
                      probe_size=3)
    tr.train()
    sig = tr._bupo_signals(3)
    probe = tr.bupo_probe
    ids, mask, pos = probe["input_ids"], probe["attention_mask"], probe["positions"]
    model = tr.model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    lf = torch.log_softmax(out.logits.float(), -1)[pos]
    lk = torch.log_softmax(model.lm_head(out.hidden_states[tr.bupo_layer + 1]).float(), -1)[pos]  # raw projection
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[pos]
    assert pos.sum() > 0 and not pos[:, -1].any()
    assert sig.full_logp == pytest.approx(lf.gather(-1, nxt[:, None]).mean().item(), abs=1e-5)
    assert sig.kl_internal_full == pytest.approx((lk.exp() * (lk - lf)).sum(-1).mean().item(), abs=1e-5)
    assert sig.entropy_internal == pytest.approx(-(lk.exp() * lk).sum(-1).mean().item(), abs=1e-5)
    assert sig.kl_internal_full > 0 and tr.bupo_switch["trace"][0]["reward"] is None  # step 1 has no prior reward
    assert tr.bupo_switch["trace"][1]["reward"] == pytest.approx(
        [h["reward"] for h in tr.state.log_history if "reward" in h][0])


def test_schedule_trains_each_layer_for_its_steps_and_resumes(tmp_path):
    common = dict(trainer_cls=Scripted, internal_schedule="0:1,2:2", save_strategy="steps", save_steps=2,
                  probe_every=0)
    first = make_trainer(tmp_path, max_steps=2, **common)
    first.train()
    assert first.by_step() == {1: (True, 0), 2: (True, 2)}
    second = make_trainer(tmp_path, model=make_model(seed=5), max_steps=5, **common)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.by_step() == {3: (True, 2), 4: (False, None), 5: (False, None)}
    logs = [h for h in second.state.log_history if "bupo/rollout_step" in h]  # the checkpoint's history first
    assert [(h["bupo/rollout_step"], h["bupo/phase"], h["bupo/internal_layer"]) for h in logs] == [
        (1.0, 1.0, 0.0), (2.0, 1.0, 2.0), (3.0, 1.0, 2.0), (4.0, 0.0, 2.0), (5.0, 0.0, 2.0)]
    assert second.bupo_switch == {"mode": "schedule", "schedule": "0:1,2:2", "step": 4,
                                  "reason": "internal_schedule 0:1,2:2 (0-based layer:rollout steps) ended"}


def test_schedule_layer_is_checked(tmp_path):
    with pytest.raises(ValueError, match="layer"):
        make_trainer(tmp_path, internal_schedule="0:1,9:1")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from support.training import letter_reward, make_model, make_trainer

    out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    rank = int(os.environ.get("RANK", 0))
    phases = {{}}

    def solved(completions, **kw):  # rank-dependent rewards: the ranks' batches and updates differ locally
        return [1.0 if i % (2 + 2 * rank) == 0 else 0.0 for i in range(len(completions))]

    tr = make_trainer(out, model=make_model(tie=True), reward=[solved, letter_reward], internal_steps="auto",
                      internal_steps_max=5, internal_switch_tolerance=1e-4, max_steps=6, probe_every=0,
                      per_device_train_batch_size=4, num_generations=4, learning_rate=3e-2, save_strategy="steps",
                      save_steps=2)
    orig = tr._bupo_decide_phase

    def spy():
        internal = orig()
        phases[tr.state.global_step + 1] = internal
        return internal

    tr._bupo_decide_phase = spy
    tr.train(resume_from_checkpoint=resume)
    rec = {{"phases": phases, "switch": tr.bupo_switch, "probe": tr.bupo_probe["input_ids"].tolist()}}
    with open(os.path.join(out, f"rank{{rank}}{{'_resumed' if resume else ''}}.json"), "w") as f:
        json.dump(rec, f)
    tr.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see test_training_ddp.py: no process-group teardown at exit
    """
)


def _torchrun(script: Path, *args: str) -> None:
    from support.launchers import launcher_env, run_group

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    proc = run_group(cmd, env=launcher_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.distributed
def test_two_gloo_ranks_take_the_same_switch_decision_and_resume_it(tmp_path):
    script = tmp_path / "ddp_switch.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS)))
    _torchrun(script, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["probe"] != r1["probe"]  # each rank's probe is its own first batch: only reduced values can agree
    assert r0["phases"] == r1["phases"] and len(r0["phases"]) == 6
    assert r0["switch"] == r1["switch"]  # the same switch step, reason and the bitwise same signal trace
    assert r0["phases"]["1"] is True and r0["switch"]["step"] is not None
    assert r0["phases"] == {str(s): s < r0["switch"]["step"] for s in range(1, 7)}
    # resumed from step 2 on the same 2 ranks: each rank gets its own probe back (not rank 0's), so the signals,
    # all-reduced over both probes, continue the uninterrupted run's trace and the switch lands where it did
    saved = torch.load(tmp_path / "checkpoint-2" / PROBE_FILE, weights_only=True)
    assert [p["input_ids"].tolist() for p in saved] == [r0["probe"], r1["probe"]]
    _torchrun(script, str(tmp_path), str(tmp_path / "checkpoint-2"))
    for r, uninterrupted in enumerate((r0, r1)):
        resumed = json.loads((tmp_path / f"rank{r}_resumed.json").read_text())
        assert resumed["probe"] == uninterrupted["probe"]
        assert resumed["switch"] == uninterrupted["switch"]
        assert resumed["phases"] == {s: i for s, i in uninterrupted["phases"].items() if int(s) > 2}
