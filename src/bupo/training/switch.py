"""When BuPO's internal phase ends: the adaptive switch (``internal_steps='auto'``) and the progressive schedule.

Both are pure objects of rollout-step indices and signal values, so they are unit-testable without a model; the
trainer (:class:`bupo.training.trainer.BuPOTrainer`) feeds them and applies their decision.

Conventions: rollout steps are 1-based (step ``s`` = the ``s``-th generation batch); layers are 0-based ``k``
(paper layer ``k + 1``); log-probabilities, KL and entropies are in nats per token.

The adaptive rule (:class:`SwitchRule`), decided once per rollout step from values that are all-reduced over the
ranks (so every rank takes the same decision), before rollout step ``s`` is generated:

- rollout step 1 is always internal; its signals are the baseline;
- switch (rollout step ``s`` is the first on the full policy) as soon as the full policy's mean log-probability of
  the fixed probe tokens has fallen ``logp_drop`` nats/token or more below its baseline, or KL(pi^k || pi) on the
  probe has risen ``kl_rise`` nats or more above its lowest value so far. This is the paper's Fig. 5 mechanism:
  while the internal phase goes on, pi^k drifts away from the layers above (KL(pi^k || pi) grows) and the full
  policy's perplexity on its own earlier samples rises; once that has started, further internal steps only damage
  the policy that is sampled and finally used;
- otherwise switch when the cap is reached: at most ``cap`` internal rollout steps.

:class:`RelativeSwitchRule` (``internal_switch_rule='relative'``) is the same rule with scale-free thresholds: the
moves must exceed ``factor`` x the probe's own step-to-step spread over the first internal steps.

pi^k's entropy on the probe and the rollout reward are logged alongside (``bupo/switch/...``) but do not decide: see
docs/training.md for the traces this rule was chosen from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SIGNALS = ("full_logp", "kl_internal_full", "entropy_internal", "reward")


@dataclass(frozen=True)
class SwitchSignals:
    """The signals measured before rollout step ``step`` (1-based) is generated, with the weights trained so far.

    ``full_logp``: mean log pi(x_{t+1} | x_{<=t}) of the probe batch's completion tokens under the full policy;
    ``kl_internal_full``: mean KL(pi^k || pi) over the same positions; ``entropy_internal``: mean H(pi^k) there;
    ``reward``: mean reward of the previous rollout batch (NaN at step 1). All in nats (reward: its own unit).
    """

    step: int
    full_logp: float
    kl_internal_full: float
    entropy_internal: float
    reward: float = math.nan


@dataclass(frozen=True)
class SwitchDecision:
    """``internal``: whether rollout step ``step`` is trained on pi^k; ``reason``: why (set when it switches)."""

    step: int
    internal: bool
    reason: str = ""


@dataclass
class SwitchRule:
    """The adaptive end of the internal phase (see the module docstring for the rule and why).

    ``cap``: at most this many internal rollout steps (``internal_steps_max``); ``logp_drop``: nats/token the
    full policy's probe log-probability may fall below its baseline before the switch; ``kl_rise``: nats
    KL(pi^k || pi) may rise above its running minimum.
    Feed :meth:`update` the signals of rollout steps 1, 2, ... in order; once it switched it stays switched.
    """

    cap: int
    logp_drop: float = 0.05
    kl_rise: float = 0.01
    trace: list[SwitchSignals] = field(default_factory=list)
    switch_step: int | None = None  # the first rollout step on the full policy (1-based)
    reason: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1:
            raise ValueError(f"the switch cap (internal_steps_max) must be an int >= 1, got {self.cap!r}")
        for name in ("logp_drop", "kl_rise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0 (nats/token), got {v!r}")

    @property
    def internal_steps(self) -> int | None:
        """Rollout steps trained on pi^k (the effective s_inter); None while still internal."""
        return None if self.switch_step is None else self.switch_step - 1

    def decide(self, step: int) -> SwitchDecision | None:
        """The decision for ``step`` when it needs no signals (already switched, or past the cap); else None."""
        if self.switch_step is not None:
            return SwitchDecision(step, step < self.switch_step, self.reason if step == self.switch_step else "")
        if step > self.cap:
            self.switch_step, self.reason = step, f"cap reached: {self.cap} internal rollout steps (internal_steps_max)"
            return SwitchDecision(step, False, self.reason)
        return None

    def update(self, signals: SwitchSignals) -> SwitchDecision:
        """Record the signals measured before rollout step ``signals.step`` and decide that step's phase."""
        expected = len(self.trace) + 1
        if signals.step != expected:
            raise ValueError(f"switch signals must come once per rollout step in order: expected step {expected}, "
                             f"got {signals.step}")
        self.trace.append(signals)
        fixed = self.decide(signals.step)
        if fixed is not None:
            return fixed
        if signals.step == 1:
            return SwitchDecision(1, True)  # the baseline: at least one internal step
        self.reason = self._reason(signals)
        if self.reason:
            self.switch_step = signals.step
            return SwitchDecision(signals.step, False, self.reason)
        return SwitchDecision(signals.step, True)

    def _moves(self, signals: SwitchSignals) -> tuple[float, float, float, float]:
        """(baseline log-prob, its drop to ``signals``, lowest KL before ``signals``, the KL's rise above it)."""
        base = self.trace[0].full_logp
        low = min(s.kl_internal_full for s in self.trace[:-1])
        return base, base - signals.full_logp, low, signals.kl_internal_full - low

    def _limits(self) -> tuple[float, float, str, str] | None:
        """(log-prob drop, KL rise) that switch at the next decision, and how each was set; None = no switch yet."""
        return self.logp_drop, self.kl_rise, f"threshold {self.logp_drop}", f"threshold {self.kl_rise}"

    def _reason(self, signals: SwitchSignals) -> str:
        """Why rollout step ``signals.step`` (>= 2) is the first on the full policy; "" = it stays internal."""
        limits = self._limits()
        if limits is None:
            return ""
        logp_limit, kl_limit, logp_how, kl_how = limits
        base, drop, low, rise = self._moves(signals)
        after = f"after {signals.step - 1} internal rollout steps"
        if math.isfinite(drop) and drop > 0 and drop >= logp_limit:
            return (f"full-policy probe log-prob fell {drop:.3f} nats/token below its rollout-step-1 value "
                    f"({base:.3f} -> {signals.full_logp:.3f}; {logp_how}) {after}")
        if math.isfinite(rise) and rise > 0 and rise >= kl_limit:
            return (f"KL(pi^k || pi) on the probe rose {rise:.3f} nats above its lowest value so far "
                    f"({low:.3f} -> {signals.kl_internal_full:.3f}; {kl_how}) {after}")
        return ""

    def describe(self) -> str:
        return (f"switch when the full policy's probe log-prob falls >= {self.logp_drop} nats/token below its "
                f"rollout-step-1 value or KL(pi^k || pi) on the probe rises >= {self.kl_rise} nats above its lowest "
                f"value so far; at the latest after {self.cap} internal rollout steps")

    # --- checkpointing: the trace is the state; replaying it reproduces the decisions ---------------------------

    def state_dict(self) -> dict[str, Any]:
        # NaN (no reward yet) is stored as null: the state goes into strict JSON files
        trace = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(s).items()}
                 for s in self.trace]
        return {"cap": self.cap, "logp_drop": self.logp_drop, "kl_rise": self.kl_rise, "trace": trace, "switch_step": self.switch_step,
                "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the stored switch step wins (it is what the run trained with)."""
        self.trace = [SwitchSignals(**{k: (math.nan if v is None else v) for k, v in s.items()})
                      for s in state.get("trace", [])]
        self.switch_step = state.get("switch_step")
        self.reason = state.get("reason", "")


def step_spread(values: list[float]) -> float:
    """The root mean square of the step-to-step changes of ``values``: the probe's own noise (same unit)."""
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    return math.sqrt(sum(d * d for d in diffs) / len(diffs)) if diffs else math.nan


@dataclass
class RelativeSwitchRule(SwitchRule):
    """The adaptive switch with scale-free thresholds: each move is measured against the probe's own noise.

    The first ``noise_steps`` internal rollout steps only measure: the step-to-step spread (RMS of the changes,
    :func:`step_spread`) of the full policy's probe log-prob and of KL(pi^k || pi) over rollout steps
    1..noise_steps+1. From then on, switch as soon as the log-prob has fallen more than ``factor`` x its spread below
    its rollout-step-1 value, or the KL has risen more than ``factor`` x its spread above its lowest value so far;
    at the latest after ``cap`` internal rollout steps. Scaling (or shifting) a signal by any amount leaves every
    decision as it is, so one ``factor`` serves models whose probes move on different scales; ``logp_drop`` and
    ``kl_rise`` are not used.
    """

    factor: float = 3.0
    noise_steps: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        f, n = self.factor, self.noise_steps
        if isinstance(f, bool) or not isinstance(f, int | float) or not (math.isfinite(f) and f > 0):
            raise ValueError(f"the switch's noise factor must be a finite number > 0, got {f!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the switch's noise steps must be an int >= 1 (rollout steps), got {n!r}")

    def _limits(self) -> tuple[float, float, str, str] | None:
        n = len(self.trace) - 1  # the rollout steps with signals before the one being decided
        if n <= self.noise_steps:
            return None  # still measuring the noise
        window = self.trace[: self.noise_steps + 1]
        spreads = [step_spread([getattr(s, name) for s in window]) for name in ("full_logp", "kl_internal_full")]
        how = [f"threshold {self.factor:g} x its step-to-step spread {x:.3g} over rollout steps "
               f"1..{self.noise_steps + 1}" for x in spreads]
        return self.factor * spreads[0], self.factor * spreads[1], how[0], how[1]

    def describe(self) -> str:
        return (f"switch when the full policy's probe log-prob falls, or KL(pi^k || pi) on the probe rises above "
                f"its lowest value, by more than {self.factor:g} x its own step-to-step spread over the first "
                f"{self.noise_steps} internal rollout steps; at the latest after {self.cap} internal rollout steps")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rule": "relative", "factor": self.factor, "noise_steps": self.noise_steps}


SWITCH_RULES = ("absolute", "relative")  # internal_switch_rule: SwitchRule (nats) or RelativeSwitchRule (x noise)


def make_switch_rule(args: Any) -> SwitchRule:
    """The adaptive switch's rule object for a :class:`bupo.training.config.BuPOConfig`."""
    if args.internal_switch_rule == "relative":
        return RelativeSwitchRule(cap=args.internal_steps, factor=args.internal_switch_noise_factor,
                                  noise_steps=args.internal_switch_noise_steps)
    return SwitchRule(cap=args.internal_steps, logp_drop=args.internal_switch_tolerance,
                      kl_rise=args.internal_switch_kl_rise)


# ---------------------------------------------------------------------------------------------------------------
# the progressive schedule


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """``"k1:s1,k2:s2"`` -> ``[(k1, s1), (k2, s2)]``: layer k1 (0-based) for s1 rollout steps, then k2 for s2, ..."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"internal_schedule must look like 'k1:s1,k2:s2' (0-based layer:rollout steps), got {text!r}")
    out = []
    for part in text.split(","):
        bits = part.strip().split(":")
        try:
            if len(bits) != 2:
                raise ValueError
            k, s = int(bits[0]), int(bits[1])
        except ValueError:
            raise ValueError(f"internal_schedule entry {part.strip()!r} is not 'k:s' (0-based layer k, s rollout "
                             f"steps), in {text!r}") from None
        if k < 0 or s < 1:
            raise ValueError(f"internal_schedule entry {part.strip()!r}: need layer k >= 0 and steps s >= 1")
        out.append((k, s))
    return out


def schedule_layer(schedule: list[tuple[int, int]], step: int) -> int | None:
    """The layer trained at rollout step ``step`` (1-based) under ``schedule``; None = the full policy."""
    end = 0
    for k, s in schedule:
        end += s
        if step <= end:
            return k
    return None
