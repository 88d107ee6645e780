"""The control arms (bupo.training.arms): one-layer, layers-only and random-reward on tiny random-init Qwen3 models
(4 layers), offline. After a step exactly the intended parameters have moved and every other one is bitwise equal."""

from __future__ import annotations

import pytest
import torch

from bupo.training.arms import ARMS, RandomReward, arm_of, parse_arms, resolve_train_layer
from bupo.training.rewards import GuardedReward
from support.training import make_config, make_trainer

pytestmark = pytest.mark.xdist_group("training")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before: dict[str, torch.Tensor], model) -> set[str]:
    """Names of the parameters that differ (bitwise) from ``before``."""
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def names(model, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def test_one_layer_moves_that_layer_only(tmp_path):
    tr = make_trainer(tmp_path, internal_steps=0, internal_layer=None, train_layer="middle", max_steps=2,
                      weight_decay=0.1)
    model = tr.model
    assert tr.bupo_run_identity()["train_layer"] == 2  # middle of 4 layers = L // 2, 0-based
    before = snapshot(model)
    tr.train()
    layer = names(model, "model.layers.2.")
    assert moved(before, model) == layer  # every weight of layer 2 moved, nothing else (no decay either)
    opt_params = {id(q) for g in tr.optimizer.param_groups for q in g["params"]}
    assert opt_params == {id(p) for n, p in model.named_parameters() if n in layer}


def test_layers_only_steps_what_bupo_internal_steps_on_the_full_objective(tmp_path):
    # rollout step 1 internal (layers-only), with projection raw: embeddings, layers 0..1 and lm_head move
    tr = make_trainer(tmp_path / "lo", internal_layer=1, internal_steps=1, internal_objective="full", max_steps=1,
                      weight_decay=0.1)
    before = snapshot(tr.model)
    tr.train()
    expected = names(tr.model, "model.embed_tokens.", "model.layers.0.", "model.layers.1.", "lm_head.")
    assert moved(before, tr.model) == expected
    assert all(p.requires_grad for p in tr.model.parameters())  # thawed when train() returns

    # BuPO moves the same parameters, but on pi^k's objective: other values
    bupo = make_trainer(tmp_path / "bupo", internal_layer=1, internal_steps=1, max_steps=1, weight_decay=0.1)
    bupo_before = snapshot(bupo.model)
    bupo.train()
    assert moved(bupo_before, bupo.model) == expected
    lower = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(tr.model.named_parameters())[lower], dict(bupo.model.named_parameters())[lower])


def test_layers_only_freezes_while_internal_and_thaws_at_the_switch(tmp_path):
    tr = make_trainer(tmp_path, internal_layer=1, internal_steps=1, internal_objective="full", max_steps=2,
                      log_policy_entropies=True)
    upper = names(tr.model, "model.layers.2.", "model.layers.3.", "model.norm.")
    seen = []

    orig = tr._compute_loss

    def spy(model, inputs):
        seen.append((tr.bupo_internal, {n for n, p in tr.model.named_parameters() if not p.requires_grad}))
        return orig(model, inputs)

    tr._compute_loss = spy
    before = snapshot(tr.model)
    tr.train()
    assert seen[0] == (True, upper)  # internal: the layers above k and the final norm take no gradient
    assert seen[-1] == (False, set())  # full phase: everything trains
    assert upper <= moved(before, tr.model)
    logs = {k for entry in tr.state.log_history for k in entry}
    assert "bupo/entropy_full" in logs  # the loss pass of a layers-only step is the full policy's


def test_random_reward_is_seeded_bernoulli_and_ignores_the_text():
    r = RandomReward(0.3, seed=7)
    draws = [x for _ in range(50) for x in r(completions=["a"] * 40)]
    assert set(draws) <= {0.0, 1.0}
    assert abs(sum(draws) / len(draws) - 0.3) < 0.04
    again = RandomReward(0.3, seed=7)
    assert [x for _ in range(50) for x in again(completions=["zzz"] * 40)] == draws  # same seed: same rewards
    assert RandomReward(0.3, seed=8)(completions=["a"] * 40) != RandomReward(0.3, seed=7)(completions=["a"] * 40)
    assert RandomReward(0.0)(completions=["a"] * 5) == [0.0] * 5
    assert RandomReward(1.0)(completions=["a"] * 5) == [1.0] * 5
    with pytest.raises(ValueError, match="probability"):
        RandomReward(1.5)


def test_random_reward_draws_follow_the_trainer_step_so_a_resume_redraws_the_same():
    class State:
        global_step = 3

    a, b = RandomReward(0.5, seed=1), RandomReward(0.5, seed=1)
    a(completions=["x"] * 8, trainer_state=type("S", (), {"global_step": 2})())
    assert a(completions=["x"] * 64, trainer_state=State()) == b(completions=["x"] * 64, trainer_state=State())


def test_random_reward_replaces_the_reward_in_the_trainer(tmp_path):
    tr = make_trainer(tmp_path, internal_steps=0, internal_layer=None, random_reward=1.0, max_steps=1)
    assert len(tr.reward_funcs) == 1
    assert isinstance(tr.reward_funcs[0], GuardedReward) and isinstance(tr.reward_funcs[0].func, RandomReward)
    tr.train()
    rewards = [e["reward"] for e in tr.state.log_history if "reward" in e]
    assert rewards and all(r == 1.0 for r in rewards)  # p = 1: every completion scored 1, whatever the letters


def test_arm_options_are_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="internal_objective must be one of layer, full"):
        make_config(tmp_path, internal_objective="pi")
    with pytest.raises(ValueError, match="random_reward must be a probability"):
        make_config(tmp_path, random_reward=2)
    with pytest.raises(ValueError, match="train_layer must be a 0-based"):
        make_config(tmp_path, train_layer="top")
    with pytest.raises(ValueError, match="needs internal_steps = 0"):
        make_trainer(tmp_path, train_layer=1)  # internal_steps = 2 from make_config
    with pytest.raises(ValueError, match="needs internal_steps > 0"):
        make_trainer(tmp_path, internal_steps=0, internal_objective="full")
    with pytest.raises(ValueError, match=r"in 0\.\.3 or 'middle'"):
        resolve_train_layer(4, 4)


def test_arm_names_and_the_arm_of_a_config(tmp_path):
    assert parse_arms("bupo, grpo,random-reward") == ["grpo", "bupo", "random-reward"]
    with pytest.raises(ValueError, match="must include grpo"):
        parse_arms("bupo")
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arms("grpo,dpo")
    assert set(ARMS) == {"grpo", "bupo", "layers-only", "one-layer", "random-reward"}
    assert arm_of(make_config(tmp_path)) == "bupo"
    assert arm_of(make_config(tmp_path, internal_objective="full")) == "layers-only"
    assert arm_of(make_config(tmp_path, internal_steps=0, internal_layer=None, train_layer=2)) == "one-layer"
    assert arm_of(make_config(tmp_path, internal_steps=0, random_reward=0.2)) == "random-reward"
    assert arm_of(make_config(tmp_path, internal_steps=0)) == "grpo"


def test_bupo_train_takes_the_arms_as_plain_flags():
    from bupo.training.arguments import parse_train_args
    from bupo.training.validation import check_run

    cfg, script = parse_train_args(["--train_layer", "middle", "--random_reward", "0.25"],
                                   overrides={"algo": "grpo"}, cuda=False)
    assert (cfg.train_layer, cfg.random_reward, cfg.internal_objective) == ("middle", 0.25, "layer")
    check_run(cfg, script)
    cfg, script = parse_train_args(["--train_layer", "2"], cuda=False)  # algo bupo (the default)
    with pytest.raises(ValueError, match="add --algo grpo"):
        check_run(cfg, script)
    cfg, script = parse_train_args(["--internal_objective", "full"], overrides={"algo": "grpo"}, cuda=False)
    with pytest.raises(ValueError, match="use --algo bupo"):
        check_run(cfg, script)
