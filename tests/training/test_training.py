"""BuPOTrainer on TRL's GRPOTrainer: phase schedule, what the internal phase updates, old log-probs, flags, resume.

Tiny random-init Qwen3 models (4 layers, k = 1) and a character tokenizer, all offline; each run is a few optimizer
steps on CPU. References are independent of bupo.internal: layer-k log-probs come from ``hidden_states[k + 1]`` of an
ordinary full forward (``output_hidden_states=True``) through lm_head.
"""

from __future__ import annotations

import time

import pytest
import torch
from trl import GRPOTrainer

from bupo.training.checkpointing import PROBE_FILE
from bupo.training.trainer import BuPOTrainer
from support.training import Snapshots, char_tokenizer, make_config, make_dataset, make_model, make_trainer

pytestmark = pytest.mark.xdist_group("training")
K = 1  # internal layer of the 4-layer test model


class Spy(BuPOTrainer):
    """Records, for every loss computation, the optimizer step it belongs to, the phase and the flags."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.loss_log: list[tuple[int, bool, bool, float | None, bool]] = []
        self.rollouts: list[dict] = []

    def _compute_loss(self, model, inputs):
        self.loss_log.append((self.state.global_step + 1, self.bupo_internal, self.vllm_importance_sampling_correction,
                              self.off_policy_mask_threshold, "old_per_token_logps" in inputs))
        return super()._compute_loss(model, inputs)

    def phases(self) -> dict[int, bool]:
        out: dict[int, set] = {}
        for step, internal, *_ in self.loss_log:
            out.setdefault(step, set()).add(internal)
        assert all(len(v) == 1 for v in out.values()), f"an optimizer step mixed phases: {out}"
        return {s: v.pop() for s, v in sorted(out.items())}


def reference_logps(model, ids, mask, keep, layer=None, temperature=1.0):
    """log p(completion token) from a plain full forward: final logits, or lm_head(hidden_states[layer + 1])."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        logits = out.logits if layer is None else model.lm_head(out.hidden_states[layer + 1])
        logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return lp[:, -keep:]


def test_phase_boundaries_one_update_per_rollout(tmp_path):
    tr = make_trainer(tmp_path, trainer_cls=Spy, internal_steps=2, max_steps=4)
    tr.train()
    assert tr.args.optimizer_steps_per_rollout == 1
    assert tr.phases() == {1: True, 2: True, 3: False, 4: False}
    logged = [h["bupo/phase"] for h in tr.state.log_history if "bupo/phase" in h]
    assert logged == [1.0, 1.0, 0.0, 0.0]
    # the same trainer with internal_steps=0 is plain GRPO
    tr0 = make_trainer(tmp_path / "grpo", trainer_cls=Spy, internal_steps=0, max_steps=2)
    tr0.train()
    assert tr0.phases() == {1: False, 2: False}


def test_phase_boundaries_several_updates_per_rollout(tmp_path):
    # 4 micro-batches per rollout x 2 iterations / 2 accumulation = 4 optimizer steps per rollout batch
    tr = make_trainer(tmp_path, trainer_cls=Spy, internal_steps=1, max_steps=8, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2, probe_every=0)
    tr.train()
    assert tr.args.optimizer_steps_per_rollout == 4
    assert tr.phases() == {s: s <= 4 for s in range(1, 9)}
    assert len(tr.loss_log) == 16  # 8 optimizer steps x 2 micro-batches
    assert all(has_old for *_, has_old in tr.loss_log)  # TRL computed old log-probs in this configuration


def test_schedule_arithmetic_matches_verl():
    # official: global_steps (1-based) <= iterative_steps is internal; here rollout index (0-based) < internal_steps
    from bupo.training.config import BuPOConfig

    cfg = BuPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
                     gradient_accumulation_steps=2, steps_per_generation=8, internal_layer=0, internal_steps=3,
                     report_to=[])
    n = cfg.optimizer_steps_per_rollout
    assert n == 4
    for global_step in range(40):
        verl_step = global_step // n + 1
        assert cfg.is_internal(global_step) == (verl_step <= 3)


@pytest.mark.parametrize("tie", [False, True])
def test_internal_phase_leaves_upper_layers_and_norm_bitwise_unchanged(tmp_path, tie):
    model = make_model(tie=tie)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = make_trainer(tmp_path, model=model, internal_steps=2, max_steps=3, weight_decay=0.1, probe_every=0)
    names = list(before)
    snap = Snapshots(tr, names)
    tr.add_callback(snap)
    tr.train()

    upper = [n for n in names if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))]
    lower = [n for n in names if n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens."))]
    assert upper and lower
    if not tie:
        lower.append("lm_head.weight")
    for step in (1, 2):  # internal steps
        for n in upper:
            assert torch.equal(snap.after[step][n], before[n]), f"{n} changed in internal step {step}"
            assert n not in snap.state_after[step], f"AdamW state was created for {n} in internal step {step}"
        changed = [n for n in lower if not torch.equal(snap.after[step][n], before[n])]
        assert len(changed) == len(lower), f"lower params that did not move in step {step}: {set(lower) - set(changed)}"
    # the switch: the full policy trains everything
    moved = [n for n in upper if not torch.equal(snap.after[3][n], snap.after[2][n])]
    assert set(moved) == set(upper)


def test_old_logprobs_are_the_pre_update_layer_k_policy(tmp_path):
    class Check(BuPOTrainer):
        seen: list = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            m = self.accelerator.unwrap_model(self.model)
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            keep = out["completion_ids"].size(1)
            cm = out["completion_mask"].bool()
            old = out["old_per_token_logps"][cm]
            ref_k = reference_logps(m, ids, mask, keep, layer=K)[cm]
            ref_full = reference_logps(m, ids, mask, keep)[cm]
            self.seen.append((self.bupo_internal, (old - ref_k).abs().max().item(), (old - ref_full).abs().max().item()))
            return out

    # num_iterations=2: TRL computes old log-probs (else it reuses logps.detach(), ratio 1 on the first update)
    tr = make_trainer(tmp_path, trainer_cls=Check, internal_steps=1, max_steps=4, num_iterations=2, probe_every=0)
    tr.train()
    assert [s[0] for s in tr.seen] == [True, False]
    (_, int_vs_k, int_vs_full), (_, full_vs_k, full_vs_full) = tr.seen
    assert int_vs_k < 1e-5 and int_vs_full > 1e-2, tr.seen
    assert full_vs_full < 1e-5 and full_vs_k > 1e-2, tr.seen


def test_is_correction_and_off_policy_mask_are_off_while_internal(tmp_path):
    tr = make_trainer(tmp_path, trainer_cls=Spy, internal_steps=2, max_steps=4, off_policy_mask_threshold=0.5,
                      vllm_importance_sampling_correction=True, probe_every=0)
    tr.train()
    by_step = {step: (internal, is_flag, opsm) for step, internal, is_flag, opsm, _ in tr.loss_log}
    assert by_step[1] == by_step[2] == (True, False, None)
    assert by_step[3] == by_step[4] == (False, True, 0.5)
    assert tr.args.vllm_importance_sampling_correction is True and tr.args.off_policy_mask_threshold == 0.5


def test_eval_uses_full_policy_and_does_not_leak_flags(tmp_path):
    """An evaluation inside the internal phase runs the full policy and leaves the internal flags in place."""
    tr = make_trainer(tmp_path, trainer_cls=Spy, internal_steps=5, max_steps=1, probe_every=0,
                      off_policy_mask_threshold=0.5, per_device_eval_batch_size=4, eval_strategy="no")
    tr.train()  # one internal step
    assert tr.bupo_internal and tr.off_policy_mask_threshold is None
    calls = []
    orig = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, model, *a, **kw):
        calls.append(self.model.training)
        return orig(self, model, *a, **kw)

    tr.model.eval()
    try:
        GRPOTrainer._get_per_token_logps_and_entropies = spy
        inputs = [{"prompt": p, "ground_truth": "0"} for p in make_dataset(4)["prompt"]]
        out = tr._generate_and_score_completions(inputs)
    finally:
        GRPOTrainer._get_per_token_logps_and_entropies = orig
        tr.model.train()
    assert "completion_ids" in out
    assert tr.bupo_internal and tr.off_policy_mask_threshold is None and tr.vllm_importance_sampling_correction is False


def test_resume_inside_internal_phase_continues_with_the_right_phase(tmp_path):
    common = dict(trainer_cls=Spy, internal_steps=2, steps_per_generation=2, save_strategy="steps", save_steps=2,
                  probe_every=1)
    first = make_trainer(tmp_path, max_steps=2, **common)  # 2 optimizer steps per rollout: stops after rollout 1
    first.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / PROBE_FILE).exists()
    assert first.phases() == {1: True, 2: True}
    second = make_trainer(tmp_path, model=make_model(seed=5), max_steps=6, **common)
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.phases() == {3: True, 4: True, 5: False, 6: False}
    for key in ("input_ids", "positions"):
        assert torch.equal(second.bupo_probe[key], first.bupo_probe[key])
    # the resumed weights are the checkpoint's, not the fresh model's
    assert second.state.global_step == 6


def test_rank_probe_picks_each_ranks_own_probe(caplog):
    from bupo.training.checkpointing import rank_probe

    probes = [{"input_ids": torch.full((1, 2), r)} for r in range(2)]
    assert [rank_probe(probes, r, 2)["input_ids"][0, 0].item() for r in range(2)] == [0, 1]
    legacy = {"input_ids": torch.zeros(1, 2)}  # one dict: what checkpoints held before probes were per rank
    assert all(rank_probe(legacy, r, 2) is legacy for r in range(2))
    with caplog.at_level("WARNING", logger="bupo.training.checkpointing"):
        assert [rank_probe(probes, r, 4)["input_ids"][0, 0].item() for r in range(4)] == [0, 1, 0, 1]
    assert caplog.text.count("come from 2 ranks, this run has 4") == 1


def test_save_steps_must_fall_on_rollout_boundaries(tmp_path):
    with pytest.raises(ValueError, match="save_steps"):
        make_config(tmp_path, steps_per_generation=2, save_strategy="steps", save_steps=3)
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        make_config(tmp_path, steps_per_generation=3, gradient_accumulation_steps=2)


def test_kl_reference_is_the_reference_models_layer_k_policy(tmp_path):
    path = tmp_path / "m"
    make_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(path).eval()

    class Check(BuPOTrainer):
        seen: list = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            keep, cm = out["completion_ids"].size(1), out["completion_mask"].bool()
            layer = K if self.bupo_internal else None
            ref = reference_logps(initial, ids, mask, keep, layer=layer)[cm]
            self.seen.append((self.bupo_internal, (out["ref_per_token_logps"][cm] - ref).abs().max().item()))
            return out

    tr = make_trainer(tmp_path / "run", model=AutoModelForCausalLM.from_pretrained(path).train(), trainer_cls=Check,
                      internal_steps=1, max_steps=2, beta=0.05, probe_every=0)
    tr.train()
    assert [s[0] for s in tr.seen] == [True, False]
    assert all(err < 1e-5 for _, err in tr.seen), tr.seen
    assert any("kl" in h for h in tr.state.log_history)


@pytest.mark.parametrize("rows", [0, 2])
def test_other_policy_entropy_runs_on_rows_spread_over_the_batch(tmp_path, rows):
    """While pi^k trains, the full policy's entropy comes from one extra forward over ``policy_entropy_rows``
    sequences spread over the rollout batch (0: all): the masked mean over exactly those rows, against a plain
    forward of the model."""
    tr = make_trainer(tmp_path, policy_entropy_rows=rows, temperature=0.7)
    tr._bupo_internal = True  # pi^k is being trained: the other policy is the full one
    g = torch.Generator().manual_seed(3)
    vocab = tr.model.config.vocab_size
    prompt, completion = torch.randint(3, vocab, (8, 5), generator=g), torch.randint(3, vocab, (8, 6), generator=g)
    cmask = torch.ones(8, 6, dtype=torch.long)
    cmask[1, 4:] = 0
    cmask[7, 2:] = 0  # the last row (picked when rows = 2) ends early
    output = {"prompt_ids": prompt, "completion_ids": completion, "prompt_mask": torch.ones(8, 5, dtype=torch.long),
              "completion_mask": cmask}
    tr._log_other_policy_entropy(output)
    got = tr._metrics["train"]["bupo/entropy_full"][-1]

    picked = list(range(8)) if rows == 0 else [0, 7]  # evenly spread: the first and the last sequence
    ids = torch.cat([prompt, completion], 1)
    with torch.no_grad():
        logits = tr.model(input_ids=ids, use_cache=False).logits[:, 4:-1].double() / 0.7
    lp = torch.log_softmax(logits, -1)
    ent = -(lp.exp() * lp).sum(-1)[picked]
    m = cmask[picked].double()
    assert got == pytest.approx(((ent * m).sum() / m.sum()).item(), rel=1e-4)
    if rows:  # the subsample is not the whole batch's mean (the parametrisation is not vacuous)
        everyone = ((-(lp.exp() * lp).sum(-1) * cmask).sum() / cmask.sum()).item()
        assert abs(got - everyone) > 1e-4


def test_logs_phase_entropies_probe_and_reward_counters(tmp_path):
    tr = make_trainer(tmp_path, internal_steps=1, max_steps=3, probe_every=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "bupo/phase" in h]
    assert [h["bupo/phase"] for h in logs] == [1.0, 0.0, 0.0]
    for h in logs:
        assert h["bupo/internal_layer"] == K
        # both policies' entropies every rollout step (one from the loss pass, one from the extra forward)
        assert 0 < h["bupo/entropy_internal"] <= torch.log(torch.tensor(float(tr.model.config.vocab_size))) + 1e-4
        assert h["bupo/entropy_full"] > 0
        assert h["bupo/reward_errors/letter_reward"] == 0 and "bupo/accuracy" in h
    # TRL's entropy metric is the trained policy's: internal in step 1, full afterwards
    assert logs[0]["entropy"] == pytest.approx(logs[0]["bupo/entropy_internal"], rel=1e-5)
    assert logs[1]["entropy"] == pytest.approx(logs[1]["bupo/entropy_full"], rel=1e-5)
    # the probe ran at rollout steps 1 and 3 (0-based 0 and 2), with every layer and the final policy
    probed = [i for i, h in enumerate(logs) if "bupo/layer_entropy/final" in h]
    assert probed == [0, 2]
    for i in probed:
        assert all(f"bupo/layer_entropy/L{k}" in logs[i] for k in range(4))
    assert {"clip_ratio/region_mean", "reward"} <= set(logs[0])


def test_probe_matches_an_independent_entropy_computation(tmp_path):
    tr = make_trainer(tmp_path, internal_steps=1, max_steps=1, probe_every=1, probe_size=3)
    tr.train()
    probe, m = tr.bupo_probe, tr.model
    # reference: every decoder layer's output captured by plain hooks, read through lm_head (raw, no norm)
    captured = {}
    hooks = [layer.register_forward_hook(lambda mod, a, o, i=i: captured.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(m.model.layers)]
    try:
        with torch.no_grad():
            out = m(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    pos = probe["positions"]
    assert pos.sum() > 0 and not pos[:, -1].any()

    def entropy(logits):
        p = torch.log_softmax(logits.float(), -1)
        return -(p.exp() * p).sum(-1)[pos].mean().item()

    tr._metrics["train"].clear()
    tr.run_probe()  # at the current weights, like the reference
    logged = tr._metrics["train"]
    for k in range(4):
        assert logged[f"bupo/layer_entropy/L{k}"][0] == pytest.approx(entropy(m.lm_head(captured[k])), abs=1e-5)
    assert logged["bupo/layer_entropy/final"][0] == pytest.approx(entropy(out.logits), abs=1e-5)


def test_trainer_survives_raising_and_slow_rewards_and_counts_them(tmp_path):
    calls = {"flaky": 0}

    def flaky(completions, **kw):
        calls["flaky"] += 1
        if calls["flaky"] % 2 == 1:
            raise RuntimeError("reward bug")
        return [1.0] * len(completions)

    def slow(completions, **kw):
        time.sleep(3.0)
        return [0.5] * len(completions)

    def good(completions, **kw):
        return [float(i % 2) for i in range(len(completions))]

    t0 = time.time()
    tr = make_trainer(tmp_path, reward=[good, flaky, slow], internal_steps=1, max_steps=2, probe_every=0,
                      trainer_kw={"reward_timeout": 0.3})
    tr.train()
    assert time.time() - t0 < 30
    last = [h for h in tr.state.log_history if "bupo/phase" in h][-1]
    assert last["bupo/reward_errors_total/flaky"] == 8  # the first call (8 completions) raised
    assert last["bupo/reward_timeouts_total/slow"] == 16  # both calls timed out
    assert last["bupo/reward_errors_total/good"] == 0 and last["bupo/accuracy"] == 0.5
    first = [h for h in tr.state.log_history if "bupo/phase" in h][0]
    assert first["rewards/flaky/mean"] == 0.0 and last["rewards/flaky/mean"] == 1.0


def test_guarded_reward_contract():
    from bupo.training.rewards import GuardedReward

    g = GuardedReward(lambda completions, **kw: [1.0, None], timeout=None, name="g")
    assert g(["a", "b"]) == [1.0, None] and g.counters() == (2, 1, 0, 0)
    bad_len = GuardedReward(lambda completions, **kw: [1.0], timeout=None)
    assert bad_len(["a", "b"]) == [0.0, 0.0] and bad_len.errors == 2
    nan = GuardedReward(lambda completions, **kw: [float("nan")], timeout=1.0)
    assert nan(["a"]) == [0.0] and nan.errors == 1
    with pytest.raises(ValueError, match="timeout"):
        GuardedReward(lambda **kw: [], timeout=0)


def test_bupo_rewards_counters_are_folded_in():
    from bupo.rewards import RewardStats, make_reward_func
    from bupo.training.rewards import GuardedReward

    stats = RewardStats()

    def scored(completions, **kw):  # a reward that handles its own per-completion failures, like bupo.rewards
        stats.record("error", 0.0, "bad latex")
        stats.record("timeout", 0.0)
        return [0.0, 1.0]

    scored.stats = stats
    g = GuardedReward(scored)
    g(["x", "y"]), g(["x", "y"])
    assert g.counters() == (4, 2, 2, 2)

    real = GuardedReward(make_reward_func("boxed_exact"))
    assert real(["\\boxed{3}", "\\boxed{4}"], ground_truth=["3", "3"]) == [1.0, 0.0]
    assert real(["\\boxed{3}", 12345], ground_truth=["3", "3"]) == [0.0, 0.0]  # malformed batch: counted, no raise
    assert real.counters() == (4, 1, 2, 0)


def test_only_user_rewards_get_the_whole_call_timeout():
    from bupo.rewards import make_reward_func
    from bupo.training.rewards import GuardedReward, guard_reward_funcs

    def user(completions, **kw):
        return [0.0] * len(completions)

    own = make_reward_func("boxed_exact")
    wrapped = guard_reward_funcs([own, user, "a-model-id"], timeout=7.0)
    assert [type(w).__name__ for w in wrapped] == ["GuardedReward", "GuardedReward", "str"]
    assert wrapped[0].func is own and wrapped[0].timeout is None  # limits each completion itself
    assert wrapped[1].func is user and wrapped[1].timeout == 7.0
    assert guard_reward_funcs(wrapped, timeout=7.0) == wrapped  # already guarded: kept as is
    # bupo's own reward, wrapped without a thread, still never raises into training and is still counted
    assert wrapped[0](["\\boxed{3}"], ground_truth=["3", "4"]) == [0.0] and wrapped[0].errors == 1
    assert isinstance(wrapped[0], GuardedReward)


def test_trainer_rejects_bad_setups(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        make_trainer(tmp_path, internal_layer=4)
    with pytest.raises(ValueError, match="auto"):
        make_trainer(tmp_path, internal_layer="auto")
    with pytest.raises(ValueError, match="vespo"):
        make_trainer(tmp_path, loss_type="vespo")
    with pytest.raises(ValueError, match="BuPOConfig"):
        from trl import GRPOConfig

        BuPOTrainer(model=make_model(), reward_funcs=lambda completions, **k: [0.0] * len(completions),
                    args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[]),
                    train_dataset=make_dataset(), processing_class=char_tokenizer())
