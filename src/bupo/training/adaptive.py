"""Which policy each rollout step trains: fixed s_inter, the adaptive switch, or the progressive schedule.

The decision is taken once per rollout step s (1-based: s = global_step // optimizer_steps_per_rollout + 1), before
its batch is generated, and holds for every update on that batch:

- fixed (Eq. 10): internal iff s <= s_inter; it follows from ``global_step`` alone, so a resume restores it;
- schedule ``k1:s1,k2:s2``: layer k1 for s1 rollout steps, then k2 for s2, then the full policy;
- adaptive (``internal_steps='auto'``): :class:`bupo.training.switch.SwitchRule` on signals measured on a fixed probe
  batch (one no-grad forward of the full model with layer k's residual stream captured), all-reduced so that every
  rank decides alike; the rule's state is saved with each checkpoint.

The rules themselves live in :mod:`bupo.training.switch`; this mixin feeds them and applies their decision.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from bupo.internal import parts
from bupo.internal.policy import check_layer

logger = logging.getLogger(__name__)


class AdaptiveSwitchMixin:
    """The phase decision of :class:`bupo.training.trainer.BuPOTrainer` (``_bupo_decide_phase``) and its record.

    Uses the trainer's ``args``, ``state``, ``_bupo_layer``, ``bupo_model`` and the probe batch (``_bupo_probe``,
    ``_make_probe``: :mod:`bupo.training.monitor`)."""

    def _bupo_init_switch(self) -> None:
        from bupo.training.switch import SwitchRule, make_switch_rule, parse_schedule

        args = self.args
        self._bupo_switch: SwitchRule | None = None
        self._bupo_schedule: list[tuple[int, int]] | None = None
        self._bupo_last_reward = float("nan")
        if args.internal_steps <= 0:
            return
        if args.internal_switch == "auto":
            self._bupo_switch = make_switch_rule(args)  # absolute (nats) or relative (x the probe's noise)
        elif args.internal_schedule is not None:
            self._bupo_schedule = parse_schedule(args.internal_schedule)
            n = parts(self.bupo_model).num_layers
            for k, _ in self._bupo_schedule:
                check_layer(k, n)

    def _bupo_rollout_step(self) -> int:
        return self.state.global_step // self.args.optimizer_steps_per_rollout + 1

    def _bupo_internal_layers(self) -> list[int]:
        """Every layer k an internal rollout step of this run can train (none for GRPO)."""
        if self.args.internal_steps <= 0:
            return []
        if self._bupo_schedule is not None:
            return sorted({k for k, _ in self._bupo_schedule})
        return [] if self._bupo_layer is None else [self._bupo_layer]

    def _bupo_decide_phase(self) -> bool:
        """Whether the rollout batch about to be generated trains pi^k; sets the layer for a schedule."""
        from bupo.training.switch import SwitchDecision, schedule_layer

        step = self._bupo_rollout_step()
        if self._bupo_schedule is not None:
            layer = schedule_layer(self._bupo_schedule, step)
            if layer is not None:
                self._bupo_layer = layer
            return layer is not None
        rule = self._bupo_switch
        if rule is None:
            return self.args.is_internal(self.state.global_step)
        if self._bupo_probe is None or self._bupo_probe_failed:
            # step 1: the probe is made from this very batch (its signals come in _bupo_after_rollout); without a
            # probe the cap alone decides
            decision = rule.decide(step) or SwitchDecision(step, True)
        else:
            decision = rule.update(self._bupo_signals(step))
        if not decision.internal and decision.reason:
            self._metrics["train"]["bupo/switch/switch_step"].append(float(step))
            # info, not warning: the console (bupo.training.console) already prints the switch line on rank 0
            logger.info("bupo: rollout step %d switches to the full policy: %s", step, decision.reason)
        return decision.internal

    def _bupo_after_rollout(self, output: dict[str, Any]) -> None:
        """After rollout step 1 is generated: the probe batch and the rule's baseline signals."""
        rewards = self._metrics["train"].get("reward")
        if rewards:
            self._bupo_last_reward = float(rewards[-1])  # TRL's mean over the gathered rewards: the same on all ranks
        if self._bupo_switch is not None and not self._bupo_switch.trace and self._bupo_layer is not None:
            if self._bupo_probe is None:
                self._bupo_probe = self._make_probe(output)
            signals = self._bupo_signals(self._bupo_rollout_step(), reward=float("nan"))
            if signals is not None:
                self._bupo_switch.update(signals)  # the baseline (rollout step 1 is always internal)

    @torch.no_grad()
    def _bupo_signals(self, step: int, reward: float | None = None):
        """:class:`bupo.training.switch.SwitchSignals` on the fixed probe batch, all-reduced (mean); None (and the
        cap decides alone from then on) when the probe forward fails."""
        from bupo.internal import Projector, capture_streams
        from bupo.training.gather import full_params
        from bupo.training.switch import SwitchSignals

        dev = self.accelerator.device
        probe = {k: v.to(dev) for k, v in self._bupo_probe.items()}
        pos = probe["positions"]
        k = self._bupo_layer
        try:
            # full_params reshards FSDP2 after: this forward runs right before the rollout, whose vLLM sync reads shards
            with full_params(self.model_wrapped, self.accelerator) as unwrapped:
                model = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
                was_training = model.training
                model.eval()  # no dropout: the signals compare weights, not noise
                try:
                    with capture_streams(model, streams=("resid_post",), layers=[k], positions=pos) as st:
                        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                                       use_cache=False).logits
                    lf = torch.log_softmax(logits[pos].float(), -1)
                    lk = torch.log_softmax(
                        Projector(model, self.args.internal_projection).logits(st[("resid_post", k)]).float(), -1)
                finally:
                    model.train(was_training)
        except Exception as exc:  # a diagnostic must never stop training: the cap then decides alone
            self._bupo_probe_failed = True
            logger.warning("adaptive-switch probe disabled, the cap decides: %r", exc)
            return None
        targets = probe["input_ids"].roll(-1, dims=1)[pos]
        pk = lk.exp()
        # log pi(x_{t+1}) of the probe tokens, KL(pi^k || pi) and H(pi^k) at the same positions
        local = torch.stack([lf.gather(-1, targets.unsqueeze(-1)).mean(), (pk * (lk - lf)).sum(-1).mean(),
                             -(pk * lk).sum(-1).mean()])
        full_logp, kl, ent = self.accelerator.reduce(local.float().to(dev), reduction="mean").cpu().tolist()
        reward = self._bupo_last_reward if reward is None else reward
        m = self._metrics["train"]
        m["bupo/switch/full_logp"].append(full_logp)
        m["bupo/switch/kl_internal_full"].append(kl)
        m["bupo/switch/entropy_internal"].append(ent)
        return SwitchSignals(step=step, full_logp=full_logp, kl_internal_full=kl, entropy_internal=ent,
                             reward=reward)

    # --- checkpoints (bupo.training.checkpointing writes and reads the file) ----------------------------------

    def _switch_state(self) -> dict[str, Any] | None:
        """What a checkpoint stores for the adaptive switch (None: no adaptive switch in this run)."""
        if self._bupo_switch is None:
            return None
        last = self._bupo_last_reward
        return {**self._bupo_switch.state_dict(), "last_reward": None if math.isnan(last) else last}

    def _load_switch_state(self, state: dict[str, Any]) -> None:
        self._bupo_switch.load_state_dict(state)
        last = state.get("last_reward")
        self._bupo_last_reward = float("nan") if last is None else float(last)

    @property
    def bupo_switch(self) -> dict[str, Any]:
        """How the internal phase ended: ``step`` = the first rollout step (1-based) on the full policy (None: training
        ended before it), ``reason``, ``mode`` (none / fixed / auto / schedule); recorded in bupo_run.json."""
        args = self.args
        if args.internal_steps <= 0:
            return {"mode": "none", "step": None, "reason": "GRPO: internal_steps = 0"}
        if self._bupo_schedule is not None:
            return {"mode": "schedule", "schedule": args.internal_schedule, "step": args.internal_steps + 1,
                    "reason": f"internal_schedule {args.internal_schedule} (0-based layer:rollout steps) ended"}
        rule = self._bupo_switch
        if rule is None:
            return {"mode": "fixed", "step": args.internal_steps + 1,
                    "reason": f"fixed internal_steps = {args.internal_steps}"}
        return {"mode": "auto", "step": rule.switch_step, "internal_rollout_steps": rule.internal_steps,
                "cap": rule.cap, "rule": rule.describe(),
                "reason": rule.reason or "training ended before the rule switched", "trace": rule.state_dict()["trace"]}
