"""The adaptive switch rule and the progressive schedule as pure objects (bupo.training.switch), and their config."""

from __future__ import annotations

import json
import math

import pytest

from bupo.training.switch import SwitchRule, SwitchSignals, parse_schedule, schedule_layer


def feed(rule: SwitchRule, logps: list[float], kls: list[float] | None = None) -> list[bool]:
    """Decisions (internal?) for rollout steps 1..len(logps) given the full policy's probe log-prob (and KL) trace."""
    out = []
    for s, lp in enumerate(logps, start=1):
        kl = 0.3 if kls is None else kls[s - 1]
        out.append(rule.update(SwitchSignals(step=s, full_logp=lp, kl_internal_full=kl, entropy_internal=0.02)).internal)
    return out


def test_switches_when_the_full_policy_logprob_falls_past_the_tolerance():
    rule = SwitchRule(cap=12, logp_drop=0.05)
    # step 1 is the baseline -0.10; -0.14 is a drop of 0.04 (< 0.05), -0.16 a drop of 0.06 -> step 4 is full
    assert feed(rule, [-0.10, -0.12, -0.14, -0.16, -0.05]) == [True, True, True, False, False]
    assert rule.switch_step == 4 and rule.internal_steps == 3
    assert "0.060 nats/token" in rule.reason and "3 internal rollout steps" in rule.reason
    # once switched it stays switched, whatever the signal does (-0.05 recovered above the baseline)
    assert rule.decide(9).internal is False


def test_no_switch_while_the_logprob_holds_or_rises():
    rule = SwitchRule(cap=12, logp_drop=0.05)
    assert all(feed(rule, [-0.10, -0.09, -0.12, -0.08, -0.149]))  # worst drop 0.049
    assert rule.switch_step is None and rule.internal_steps is None and rule.reason == ""


def test_switches_when_kl_to_the_full_policy_rises_from_its_low():
    # the study's seed 1: KL(pi^k || pi) falls, then climbs back; log-prob nearly flat
    rule = SwitchRule(cap=12, logp_drop=0.05, kl_rise=0.01)
    kls = [0.241, 0.195, 0.199, 0.2086, 0.218]
    assert feed(rule, [-0.088, -0.093, -0.095, -0.099, -0.102], kls) == [True, True, True, False, False]
    assert rule.switch_step == 4 and "KL(pi^k || pi) on the probe rose 0.014 nats" in rule.reason
    # a KL that only falls (pi^k catching up with pi) never switches by itself
    falling = SwitchRule(cap=12)
    assert all(feed(falling, [-0.1] * 6, [0.39, 0.33, 0.15, 0.08, 0.05, 0.049]))


def test_cap_reached():
    rule = SwitchRule(cap=3, logp_drop=0.05)
    assert feed(rule, [-0.1] * 5) == [True, True, True, False, False]
    assert rule.switch_step == 4 and rule.internal_steps == 3 and rule.reason.startswith("cap reached: 3")


def test_step_one_is_always_internal_and_nan_signals_do_not_switch():
    rule = SwitchRule(cap=5, logp_drop=0.05)
    assert feed(rule, [-5.0, math.nan, -0.1]) == [True, True, True]  # a NaN probe value is no evidence


def test_signals_must_come_in_order():
    rule = SwitchRule(cap=5)
    rule.update(SwitchSignals(1, -0.1, 0.3, 0.02))
    with pytest.raises(ValueError, match="expected step 2, got 3"):
        rule.update(SwitchSignals(3, -0.1, 0.3, 0.02))


def test_state_round_trip_through_strict_json_continues_identically():
    logps = [-0.10, -0.12, -0.13, -0.2, -0.3]
    whole = SwitchRule(cap=12)
    expected = feed(whole, logps)
    first = SwitchRule(cap=12)
    feed(first, logps[:2])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # reward NaN -> null
    resumed = SwitchRule(cap=12)
    resumed.load_state_dict(state)
    assert math.isnan(resumed.trace[0].reward)
    got = expected[:2] + [resumed.update(SwitchSignals(s, lp, 0.3, 0.02)).internal
                          for s, lp in enumerate(logps[2:], start=3)]
    assert got == expected and resumed.switch_step == whole.switch_step == 4


@pytest.mark.parametrize("cap", [0, -1, 1.5, True])
def test_bad_cap(cap):
    with pytest.raises(ValueError, match="internal_steps_max"):
        SwitchRule(cap=cap)
    with pytest.raises(ValueError, match="kl_rise must be a number > 0"):
        SwitchRule(cap=3, kl_rise=0)


def test_schedule_parsing_and_layer_per_step():
    sched = parse_schedule(" 2:3, 5:2 ")
    assert sched == [(2, 3), (5, 2)]
    assert [schedule_layer(sched, s) for s in range(1, 8)] == [2, 2, 2, 5, 5, None, None]


@pytest.mark.parametrize("text", ["", "3", "a:2", "3:0", "-1:2", "1:2:3", "1:2,"])
def test_bad_schedule(text):
    with pytest.raises(ValueError, match="internal_schedule"):
        parse_schedule(text)


def _config(tmp_path, **kw):
    from bupo.training.config import BuPOConfig

    return BuPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                      num_generations=4, **kw)


def test_config_auto_and_schedule(tmp_path):
    c = _config(tmp_path, internal_layer=1, internal_steps="auto", internal_steps_max=6)
    assert (c.internal_switch, c.internal_steps, c.internal_steps_max) == ("auto", 6, 6)
    c = _config(tmp_path, internal_steps="3", internal_layer=1)
    assert (c.internal_switch, c.internal_steps) == ("fixed", 3)
    c = _config(tmp_path, internal_schedule="0:2,2:3")
    assert (c.internal_layer, c.internal_steps) == (0, 5)
    with pytest.raises(ValueError, match="needs internal_steps_max"):
        _config(tmp_path, internal_layer=1, internal_steps="auto")
    with pytest.raises(ValueError, match="exclude each other"):
        _config(tmp_path, internal_steps="auto", internal_steps_max=4, internal_schedule="0:2")
    with pytest.raises(ValueError, match="or 'auto'"):
        _config(tmp_path, internal_layer=1, internal_steps="soon")


def test_cli_flags_reach_the_config():
    from bupo.training.run import parse_train_args

    overrides = {"internal_steps": "auto", "internal_steps_max": 7, "internal_layer": 2, "output_dir": "unused"}
    args, _ = parse_train_args([], overrides=overrides, cuda=False)
    assert (args.internal_switch, args.internal_steps) == ("auto", 7)
    args, _ = parse_train_args(["--internal_steps", "auto", "--internal_steps_max", "5"], cuda=False)
    assert (args.internal_switch, args.internal_steps) == ("auto", 5)
    args, _ = parse_train_args([], overrides={"internal_schedule": "1:2,3:1"}, cuda=False)
    assert (args.internal_layer, args.internal_steps, args.internal_schedule) == (1, 3, "1:2,3:1")
