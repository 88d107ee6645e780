"""What :class:`bupo.training.trainer.BuPOTrainer` logs besides TRL's metrics; none of it affects the updates.

Per rollout step (``bupo/...`` keys of the log history): the phase, the rollout step and k; both policies' entropies
(the trained one copied from TRL's loss pass, the other one from one extra no-grad forward); the reward guard's
counters (accuracy, errors, timeouts: globally summed); and every ``probe_every`` rollout steps the entropy of every
layer's internal policy and of the final policy on a fixed probe batch (the first ``probe_size`` sequences of the
first rollout batch), which the adaptive switch measures its signals on too. Entropies in nats, layers 0-based.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bupo.internal import internal_policy
from bupo.training.rewards import GuardedReward

logger = logging.getLogger(__name__)


class MonitorMixin:
    """The monitoring of :class:`bupo.training.trainer.BuPOTrainer`: entropies, reward counters and the probe.

    Uses the trainer's ``args``, ``_bupo_internal``, ``_bupo_layer`` and ``bupo_model``."""

    def _init_monitor(self) -> None:
        self._bupo_probe: dict[str, torch.Tensor] | None = None
        self._bupo_probe_failed = False

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; then bupo/entropy_{phase} = the ``entropy`` TRL just logged for this micro-batch.

        TRL's value is the global masked mean over completion tokens of the trained policy's entropy (the loss pass,
        so pi^k while internal), already all-reduced: copying it costs no extra reduction or host sync.
        """
        loss = super()._compute_loss(model, inputs)
        if self.model.training:
            which = "internal" if self._bupo_internal else "full"
            self._metrics["train"][f"bupo/entropy_{which}"].append(self._metrics["train"]["entropy"][-1])
        return loss

    def _monitor_rollout(self, output: dict[str, Any]) -> None:
        args = self.args
        rollout_index = self.state.global_step // args.optimizer_steps_per_rollout  # 0-based
        m = self._metrics["train"]
        m["bupo/phase"].append(1.0 if self._bupo_internal else 0.0)
        m["bupo/rollout_step"].append(float(rollout_index + 1))
        if self._bupo_layer is not None:
            m["bupo/internal_layer"].append(float(self._bupo_layer))
        self._log_reward_counters("train")
        multimodal = any(k in output for k in ("pixel_values", "image_grid_thw", "num_images"))
        if args.log_policy_entropies and self._bupo_layer is not None and not multimodal:
            self._log_other_policy_entropy(output)
        if args.probe_every and self._bupo_layer is not None and not multimodal and not self._bupo_probe_failed:
            if self._bupo_probe is None:
                self._bupo_probe = self._make_probe(output)
            if rollout_index % args.probe_every == 0:
                self.run_probe()

    def _log_reward_counters(self, mode: str) -> None:
        guarded = [f for f in self.reward_funcs if isinstance(f, GuardedReward)]
        if not guarded:
            return
        now = torch.tensor([f.counters() for f in guarded], dtype=torch.float64)
        # one all-reduce: the global totals; this rollout's global delta = totals - the previous global totals
        total = self.accelerator.reduce(now.to(self.accelerator.device), reduction="sum").cpu()
        delta = total - getattr(self, "_bupo_reward_prev", torch.zeros_like(total))
        self._bupo_reward_prev = total
        for f, d, t in zip(guarded, delta.tolist(), total.tolist(), strict=True):
            n, correct, err, tout = d
            if n > 0 and f is guarded[0]:
                self._metrics[mode]["bupo/accuracy"].append(correct / n)
            self._metrics[mode][f"bupo/reward_errors/{f.__name__}"].append(err)
            self._metrics[mode][f"bupo/reward_timeouts/{f.__name__}"].append(tout)
            self._metrics[mode][f"bupo/reward_errors_total/{f.__name__}"].append(t[2])
            self._metrics[mode][f"bupo/reward_timeouts_total/{f.__name__}"].append(t[3])

    @torch.no_grad()
    def _log_other_policy_entropy(self, output: dict[str, Any]) -> None:
        """Entropy of the policy NOT being trained on this rollout batch: one extra no-grad forward."""
        from trl import GRPOTrainer
        from trl.models.utils import disable_gradient_checkpointing

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        batch_size = self.args.per_device_train_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self._bupo_internal:  # GRPO's own method: the full policy
                _, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, self.model, ids, mask, keep, batch_size=batch_size, compute_entropy=True)
                which = "full"
            else:
                with internal_policy(self.bupo_model, self._bupo_layer, self.args.internal_projection):
                    _, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                        self, self.model, ids, mask, keep, batch_size=batch_size, compute_entropy=True)
                which = "internal"
        cm = output["completion_mask"].to(ent.dtype)
        t = self.accelerator.reduce(torch.stack([(ent * cm).sum(), cm.sum()]).float(), reduction="sum")
        self._metrics["train"][f"bupo/entropy_{which}"].append((t[0] / t[1].clamp(min=1.0)).item())

    def _make_probe(self, output: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A fixed probe batch: the first ``probe_size`` sequences of the first rollout batch, frozen (CPU)."""
        n = max(1, min(self.args.probe_size, output["prompt_ids"].size(0)))
        pm, cm = output["prompt_mask"][:n], output["completion_mask"][:n]
        ids = torch.cat([output["prompt_ids"][:n], output["completion_ids"][:n]], dim=1)
        mask = torch.cat([pm, cm], dim=1)
        # position t predicts token t+1: keep positions whose next token is a completion token
        positions = torch.zeros_like(mask, dtype=torch.bool)
        positions[:, :-1] = torch.cat([torch.zeros_like(pm), cm], dim=1)[:, 1:].bool()
        return {"input_ids": ids.cpu(), "attention_mask": mask.cpu(), "positions": positions.cpu()}

    @torch.no_grad()
    def run_probe(self) -> None:
        """Log bupo/layer_entropy/L{k} (0-based k; resid_post of every layer, projection as configured) and /final on
        the probe batch, at the current weights (all-reduced mean over ranks)."""
        from trl.models import unwrap_model_for_generation

        from bupo.internal.streams import stream_stats

        dev = self.accelerator.device
        probe = {k: v.to(dev) for k, v in self._bupo_probe.items()}
        try:
            # ZeRO-3 gathers the parameters (as for generation); DDP/FSDP2 just unwrap
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gather_deepspeed3_params=True) as unwrapped:
                model = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
                st = stream_stats(model, probe["input_ids"], probe["attention_mask"], streams=("resid_post",),
                                  positions=probe["positions"], projection=self.args.internal_projection)
        except Exception as exc:  # a diagnostic must never stop training
            self._bupo_probe_failed = True
            logger.warning("layer-entropy probe disabled: %r", exc)
            return
        values = [st.stats[("resid_post", k)].entropy.mean() for k in range(st.num_layers)]
        values.append(st.final.entropy.mean())
        t = self.accelerator.reduce(torch.stack(values).float().to(dev), reduction="mean").cpu().tolist()
        m = self._metrics["train"]
        for k in range(st.num_layers):
            m[f"bupo/layer_entropy/L{k}"].append(t[k])
        m["bupo/layer_entropy/final"].append(t[-1])

    @property
    def bupo_probe(self) -> dict[str, torch.Tensor] | None:
        """The fixed probe batch (``input_ids``, ``attention_mask``, ``positions``: CPU tensors) once made, else None."""
        return self._bupo_probe
