"""The scale-free adaptive switch (bupo.training.switch.RelativeSwitchRule) on synthetic probe sequences: the same
decision whatever the signals' scale, no switch while the noise is measured, none on noise alone, and in a tiny
training run."""

from __future__ import annotations

import random

import pytest

from bupo.training.switch import RelativeSwitchRule, SwitchRule, SwitchSignals, make_switch_rule, step_spread
from support.training import make_trainer


def sequence(seed: int, *, drift_from: int | None, steps: int = 14, noise: float = 0.01, drift: float = 0.01):
    """(full_logp, kl) per rollout step: noise, plus - from step ``drift_from`` on - a falling log-prob / rising KL."""
    rng = random.Random(seed)
    out = []
    for s in range(1, steps + 1):
        d = 0.0 if drift_from is None or s < drift_from else (s - drift_from + 1) * drift
        out.append((-0.5 + rng.gauss(0, noise) - d, 0.2 + rng.gauss(0, noise) + 0.5 * d))
    return out


def switch_step(rule: SwitchRule, seq, scale: float = 1.0, shift: float = 0.0) -> int | None:
    for step, (logp, kl) in enumerate(seq, start=1):
        d = rule.update(SwitchSignals(step, scale * logp + shift, scale * kl + shift, 0.1))
        if not d.internal:
            return d.step
    return None


@pytest.mark.parametrize("seed", range(6))
def test_the_same_decision_at_every_scale(seed):
    seq = sequence(seed, drift_from=8, drift=0.03)
    ref = switch_step(RelativeSwitchRule(cap=20), seq)
    assert ref is not None and ref >= 5  # it fires on the drift, after the noise window (steps 1..4)
    for scale, shift in ((2.0 ** -10, 0.0), (2.0 ** 8, 0.0), (1.0, 3.0), (1e-3, 0.0), (1e3, -7.0)):
        assert switch_step(RelativeSwitchRule(cap=20), seq, scale, shift) == ref, (scale, shift)


def test_the_absolute_rule_moves_with_the_scale_where_the_relative_one_does_not():
    seq = sequence(0, drift_from=8, drift=0.03)
    absolute = [switch_step(SwitchRule(cap=20), seq, scale) for scale in (0.01, 1.0, 100.0)]
    relative = [switch_step(RelativeSwitchRule(cap=20), seq, scale) for scale in (0.01, 1.0, 100.0)]
    assert len(set(absolute)) > 1  # nats thresholds: a model with 100x smaller moves never switches, a larger at once
    assert len(set(relative)) == 1


def test_no_switch_while_measuring_and_none_on_noise_alone():
    flat = sequence(3, drift_from=None, steps=12, noise=0.02)
    assert switch_step(RelativeSwitchRule(cap=12, noise_steps=3), flat) is None  # noise only: ends at the cap
    drift = [(-0.1 * s, 0.0) for s in range(12)]  # the log-prob falls 0.1 per step from the first update on
    assert switch_step(RelativeSwitchRule(cap=12, noise_steps=4), drift) == 6  # steps 2..5 only measure the spread
    assert switch_step(SwitchRule(cap=12), drift) == 2  # the absolute rule already fires at step 2


def test_fires_once_the_move_exceeds_c_times_the_spread():
    # steps 1..4 alternate +-0.01 (spread 0.02); then the log-prob falls 0.05 (> 2 x 0.02) at step 6
    logps = [0.0, -0.01, 0.01, -0.01, 0.005, -0.05]
    rule = RelativeSwitchRule(cap=10, factor=2.0, noise_steps=3)
    steps = [rule.update(SwitchSignals(s, v, 0.1, 0.0)) for s, v in enumerate(logps, start=1)]
    assert [d.internal for d in steps] == [True] * 5 + [False]
    assert "2 x its step-to-step spread 0.0" in steps[-1].reason and "rollout steps 1..4" in steps[-1].reason
    assert step_spread([0.0, -0.01, 0.01, -0.01]) == pytest.approx(((0.01 ** 2 + 0.02 ** 2 + 0.02 ** 2) / 3) ** 0.5)


def test_state_round_trip_replays_the_same_decisions():
    seq = sequence(1, drift_from=7, drift=0.03)
    rule = RelativeSwitchRule(cap=20)
    step = switch_step(rule, seq)
    state = rule.state_dict()
    assert state["rule"] == "relative" and state["factor"] == 3.0 and state["noise_steps"] == 3
    again = RelativeSwitchRule(cap=20)
    again.load_state_dict(state)
    assert again.switch_step == step and again.decide(step).internal is False


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="noise factor"):
        RelativeSwitchRule(cap=3, factor=0)
    with pytest.raises(ValueError, match="noise steps"):
        RelativeSwitchRule(cap=3, noise_steps=0)
    from support.training import make_config

    with pytest.raises(ValueError, match="internal_switch_rule must be 'absolute' or 'relative'"):
        make_config(tmp_path, internal_switch_rule="noise")


def test_the_trainer_uses_the_relative_rule_when_asked(tmp_path):
    tr = make_trainer(tmp_path, internal_steps="auto", internal_steps_max=3, internal_switch_rule="relative",
                      internal_switch_noise_steps=1, max_steps=4)
    assert isinstance(tr._bupo_switch, RelativeSwitchRule) and tr._bupo_switch.noise_steps == 1
    tr.train()
    info = tr.bupo_switch
    assert info["mode"] == "auto" and "step-to-step spread" in info["rule"]
    assert info["step"] is not None and 3 <= info["step"] <= 4  # no switch before noise_steps + 2; the cap is 3
    assert len(info["trace"]) >= 2
    assert isinstance(make_switch_rule(tr.args.resolved(internal_switch_rule="absolute")), SwitchRule)
