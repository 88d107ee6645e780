"""What :class:`bupo.training.trainer.BuPOTrainer` logs besides TRL's metrics; none of it affects the updates.

Per rollout step (``bupo/...`` keys of the log history): the phase, the rollout step and k; both policies' entropies
(the trained one copied from TRL's loss pass, the other one from one extra no-grad forward); the reward guard's
counters (accuracy, errors, timeouts: globally summed); and every ``probe_every`` rollout steps the entropy of every
layer's internal policy and of the final policy on a fixed probe batch (the first ``probe_size`` sequences of the
first rollout batch), which the adaptive switch measures its signals on too. Entropies in nats, layers 0-based.

A run that cannot learn says so, once, in one warning line: when every group's rewards were equal (TRL's
``frac_reward_zero_std`` = 1, so every advantage is 0 and the policy-gradient loss has no gradient) for
:data:`CANNOT_LEARN_AFTER` rollout steps in a row, or the logged gradient norm was 0 that many times in a row. The line
gives the numbers (mean reward, the fraction of completions clipped at ``max_completion_length``) and the likely causes.

A run that diverges stops: a non-finite gradient norm (checked every optimizer step, before the weights move: it is
computed for clipping and logging anyway), a non-finite logged loss, or non-finite weights when a checkpoint or the
final model is about to be saved raise :class:`NonFiniteTraining` (one line: the step, the value, the last good
checkpoint, which stays as it was).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from bupo.internal import internal_policy
from bupo.training.rewards import GuardedReward

logger = logging.getLogger(__name__)

CANNOT_LEARN_AFTER = 3  # rollout steps (or logged gradient norms) in a row without a learning signal before the warning


class NonFiniteTraining(FloatingPointError):
    """The loss, the gradients or the weights became NaN/inf: the run stops before it saves or steps on them."""


def _as_float(x: Any) -> float:
    full = getattr(x, "full_tensor", None)  # an FSDP2 DTensor
    return float(full() if full is not None else x)


class MonitorMixin:
    """The monitoring of :class:`bupo.training.trainer.BuPOTrainer`: entropies, reward counters and the probe.

    Uses the trainer's ``args``, ``_bupo_internal``, ``_bupo_layer`` and ``bupo_model``."""

    def _init_monitor(self) -> None:
        self._bupo_probe: dict[str, torch.Tensor] | None = None
        self._bupo_probe_failed = False
        self._bupo_no_signal = 0  # rollout steps in a row whose rewards were equal within every group
        self._bupo_zero_grad = 0  # logged gradient norms in a row that were 0
        self._bupo_cannot_learn_warned = False

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss; then bupo/entropy_{phase} = the ``entropy`` TRL just logged for this micro-batch.

        TRL's value is the global masked mean over completion tokens of the trained policy's entropy (the loss pass,
        so pi^k while internal), already all-reduced: copying it costs no extra reduction or host sync.
        """
        loss = super()._compute_loss(model, inputs)
        if self.model.training:
            which = "internal" if self._bupo_trains_pik() else "full"
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
        self._check_learning_signal()
        multimodal = any(k in output for k in ("pixel_values", "image_grid_thw", "num_images"))
        if args.log_policy_entropies and self._bupo_layer is not None and not multimodal:
            self._log_other_policy_entropy(output)
        if args.probe_every and self._bupo_layer is not None and not multimodal and not self._bupo_probe_failed:
            if self._bupo_probe is None:
                self._bupo_probe = self._make_probe(output)
            if rollout_index % args.probe_every == 0:
                self.run_probe()

    def _check_learning_signal(self) -> None:
        """Count rollout steps in a row with ``frac_reward_zero_std`` = 1 (TRL's, over the gathered rewards: the same
        on every rank); warn at :data:`CANNOT_LEARN_AFTER`."""
        zero_std = self._metrics["train"].get("frac_reward_zero_std")
        if not zero_std:
            return
        self._bupo_no_signal = self._bupo_no_signal + 1 if zero_std[-1] >= 1.0 else 0
        if self._bupo_no_signal >= CANNOT_LEARN_AFTER:
            self._warn_cannot_learn(f"the rewards were equal within every group for {self._bupo_no_signal} rollout "
                                    "steps in a row (frac_reward_zero_std 1.00: every advantage 0, no gradient)")

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """transformers' gradient norm (every optimizer step, before ``optimizer.step()``); a NaN/inf one stops the
        run before it reaches the weights (the norm is global: every rank stops at the same step)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(_as_float(grad_norm)):
            self._stop_non_finite(f"the gradient norm is {_as_float(grad_norm)}")
        return grad_norm

    def _weights_finite(self) -> bool:
        """Whether every weight of every rank is finite (one pass over the local shards, one all-reduce)."""
        bad = torch.zeros((), device=self.accelerator.device)
        with torch.no_grad():
            for p in self.model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                if local.numel() and local.is_floating_point():
                    bad += (~torch.isfinite(local)).any().to(bad.device, bad.dtype)
        return self.accelerator.reduce(bad, reduction="sum").item() == 0

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' save (checkpoints and the final model), refused when any weight is NaN/inf."""
        if not self._weights_finite():
            self._stop_non_finite("some weights are NaN/inf", step_done=True)
        super().save_model(output_dir, _internal_call)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout; when it fails on weights an update made NaN/inf (sampling from NaN probabilities), the
        run stops with :class:`NonFiniteTraining` instead of the sampler's error (checked only on failure)."""
        try:
            return super()._generate_and_score_completions(inputs)
        except NonFiniteTraining:
            raise
        except Exception:
            if self._weights_finite():
                raise
            self._stop_non_finite(f"the weights are NaN/inf after step {self.state.global_step}", step_done=True)

    def _stop_non_finite(self, what: str, step_done: bool = False) -> None:
        """Raise :class:`NonFiniteTraining` with the step (``step_done``: the one just counted, else the one under
        way), what was seen, the likely causes and the last good (complete) checkpoint."""
        from bupo.training.resume import resolve_resume

        try:
            good = resolve_resume("latest", self.args.output_dir)
        except ValueError:  # none, or none complete
            good = None
        step = self.state.global_step if step_done else self.state.global_step + 1
        kept = f"the last good checkpoint {good} is kept" if good else "no checkpoint was saved before it"
        raise NonFiniteTraining(
            f"training diverged at optimizer step {step}: {what} (a learning rate too high, now "
            f"{self.args.learning_rate:g}, or low-precision overflow); nothing was saved from it, {kept}"
            + (" (resume with --resume and a lower --learning_rate)" if good else ""))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, after counting logged gradient norms of 0 in a row (warn at :data:`CANNOT_LEARN_AFTER`); a
        NaN/inf training loss stops the run (:class:`NonFiniteTraining`)."""
        loss = logs.get("loss")
        if self.model.training and isinstance(loss, int | float) and not math.isfinite(loss):
            self._stop_non_finite(f"the training loss is {loss}", step_done=True)
        grad_norm = logs.get("grad_norm")
        if self.model.training and isinstance(grad_norm, int | float):
            self._bupo_zero_grad = self._bupo_zero_grad + 1 if grad_norm == 0 else 0
            if self._bupo_zero_grad >= CANNOT_LEARN_AFTER:
                self._warn_cannot_learn(f"the gradient norm was 0.0 at {self._bupo_zero_grad} logged steps in a row "
                                        "(no weight moves)")
        super().log(logs, start_time)

    def _warn_cannot_learn(self, what: str) -> None:
        """One warning line, once per run, on the main process: what was seen, the numbers, the likely causes."""
        if self._bupo_cannot_learn_warned:
            return
        self._bupo_cannot_learn_warned = True
        if not self.accelerator.is_main_process:
            return
        m = self._metrics["train"]
        reward = m.get("reward")[-1] if m.get("reward") else float("nan")
        clipped = m.get("completions/clipped_ratio")[-1] if m.get("completions/clipped_ratio") else float("nan")
        limit = self.args.max_completion_length
        causes = []
        if reward == 0:
            causes.append("the reward never fires (check the reward and the ground truths; `--reward final_number` "
                          "for models that seldom write \\boxed{})")
        if clipped > 0:
            causes.append(f"completions truncated before their answer (raise --max_completion_length, now {limit})")
        causes.append("every completion of a prompt scores the same (more --num_generations, a higher --temperature)")
        logger.warning("bupo: this run cannot learn: %s; mean reward %.3f, %.0f%% of completions clipped at "
                       "max_completion_length %s. Likely causes: %s.", what, reward, 100 * clipped, limit,
                       "; ".join(causes))

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
        """Entropy of the policy NOT being trained on this rollout batch: one extra no-grad forward over
        ``policy_entropy_rows`` of its sequences, spread evenly over the batch (all of them when 0)."""
        from trl import GRPOTrainer
        from trl.models.utils import disable_gradient_checkpointing

        from bupo.internal.sharding import outside_step

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        cm = output["completion_mask"]
        rows = self.args.policy_entropy_rows
        if 0 < rows < ids.size(0):  # the same count on every rank: sharded forwards stay in step
            pick = torch.linspace(0, ids.size(0) - 1, rows, device=ids.device).round().long()
            ids, mask, cm = ids[pick], mask[pick], cm[pick]
        keep = output["completion_ids"].size(1)
        batch_size = self.args.per_device_train_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                outside_step(self.model):  # no backward follows this forward: FSDP2's root would stay unsharded
            if self._bupo_trains_pik():  # GRPO's own method: the full policy
                _, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, self.model, ids, mask, keep, batch_size=batch_size, compute_entropy=True)
                which = "full"
            else:
                with internal_policy(self.bupo_model, self._bupo_layer, self.args.internal_projection):
                    _, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                        self, self.model, ids, mask, keep, batch_size=batch_size, compute_entropy=True)
                which = "internal"
        cm = cm.to(ent.dtype)
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
        from bupo.internal.streams import stream_stats
        from bupo.training.gather import full_params

        dev = self.accelerator.device
        probe = {k: v.to(dev) for k, v in self._bupo_probe.items()}
        try:
            # ZeRO-3 gathers the parameters (as for generation); DDP/FSDP2 unwrap (FSDP2 resharded after)
            with full_params(self.model_wrapped, self.accelerator) as unwrapped:
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
