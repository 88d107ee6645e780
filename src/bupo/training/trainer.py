"""``BuPOTrainer``: Bottom-up Policy Optimization (arXiv 2512.19673) on TRL's ``GRPOTrainer`` (trl==1.16.0).

The whole algorithm is the difference to GRPO below (``BuPOTrainer`` up to the monitoring section). In the paper's
notation, with rollouts o_i ~ pi_theta_old (always the FULL model) and group-normalised advantages A_i:

    GRPO (Eq. 3):   J = E[ 1/G sum_i 1/|o_i| sum_t min( r_it A_i, clip(r_it, 1-eps, 1+eps) A_i ) ],
                    r_it = pi_theta(o_it | s_it) / pi_theta_old(o_it | s_it)
    IPA  (Eq. 9):   the same with rho^l_it = pi^l_Layer(o_it | s_it) / pi^l_Layer,old(o_it | s_it),
                    pi^l_Layer = softmax(H^l E_u^T)   (residual stream after layer l, no final norm)
    BuPO (Eq. 10):  J_BuPO = J_IPA while s_cur <= s_inter, J_GRPO afterwards.

So BuPO only changes *which policy's log-probs* TRL computes, for the old (pre-update, no-grad) and the new
(trained) log-probs alike, during the first ``internal_steps`` rollout steps. The layer-k internal policy is obtained by
running the model's own forward truncated after layer k (:func:`bupo.internal.internal_policy`): no compute above k,
and layers above k plus the final norm get no gradient (``grad is None``), so AdamW - weight decay included - leaves
them bitwise unchanged (Eq. 14-15). Gradients reach embeddings, layers 0..k and lm_head (tied or not).

Layer ``k`` is 0-based as in the official code (paper layer k+1). Entropies are in nats. Projection ``raw`` (paper)
or ``final_norm`` (logit lens) per ``BuPOConfig.internal_projection``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from bupo.internal import internal_policy, parts
from bupo.internal.policy import check_layer
from bupo.training.config import BuPOConfig
from bupo.training.rewards import GuardedReward, guard_reward_funcs

logger = logging.getLogger(__name__)

PROBE_FILE = "bupo_probe.pt"
CHECKPOINT_MARKER = "bupo_checkpoint.json"  # written last: a checkpoint folder without it is incomplete
STAGING_DIR = ".checkpoint-staging"  # not matched by checkpoint-*, so never taken for a checkpoint


def read_checkpoint_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder, or None when absent or unreadable."""
    import json

    try:
        data = json.loads((Path(folder) / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is): the marker's files must all be there with
    their recorded sizes; a folder without a marker (saved by plain TRL) needs a readable trainer_state.json and
    no empty file."""
    import json

    folder = Path(folder)
    marker = read_checkpoint_marker(folder)
    if marker is not None:
        for f, size in (marker.get("files") or {}).items():
            p = folder / f
            if not p.exists():
                return f"{f} missing"
            if p.stat().st_size != size:
                return f"{f} is {p.stat().st_size} bytes, {size} when saved"
        return None
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except OSError:
        return "no trainer_state.json"
    except ValueError:
        return "trainer_state.json unreadable"
    empty = sorted(p.name for p in folder.iterdir() if p.is_file() and p.stat().st_size == 0)
    if empty:
        return f"empty {', '.join(empty)}"
    return None
SWITCH_FILE = "bupo_switch.json"  # the adaptive switch's state (issue 16), next to the probe in each checkpoint


def _hf_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """The HF model under DDP / DeepSpeed / FSDP1 wrappers (FSDP2 works in place) and PEFT."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _cpu_map_location(device: torch.device) -> Iterator[None]:
    """Several CPU processes: Trainer loads the optimizer with map_location=args.device = "cpu:<rank>", which
    torch.load cannot restore ("don't know how to restore data location ... cpu:0"); map it to "cpu"."""
    if device.type != "cpu" or device.index is None:
        yield
        return
    real = torch.load

    def load(*a: Any, **kw: Any) -> Any:
        if isinstance(kw.get("map_location"), (str, torch.device)) and torch.device(kw["map_location"]).type == "cpu":
            kw["map_location"] = "cpu"
        return real(*a, **kw)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


class BuPOTrainer(GRPOTrainer):
    """GRPOTrainer whose first ``args.internal_steps`` rollout steps optimise the layer-``args.internal_layer`` policy.

    Same constructor as ``GRPOTrainer``; ``args`` must be a :class:`BuPOConfig` with ``internal_layer`` resolved to
    an int (not ``"auto"``) when ``internal_steps > 0``. Reward callables are wrapped in
    :class:`bupo.training.rewards.GuardedReward` (never raise, counted; user-supplied ones are time-limited by
    ``reward_timeout`` seconds per call, bupo's own limit each completion themselves).

    KL (``beta > 0``): in the internal phase the reference log-probs are the *reference model's own layer-k policy*
    (pi^k_ref, through the same truncated forward), so the k3 term is KL(pi^k_theta || pi^k_ref), zero at step 0.
    The paper and the presets use ``beta = 0``.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: BuPOConfig | None = None, *a: Any,
                 reward_timeout: float | None = 60.0, **kw: Any) -> None:
        if not isinstance(args, BuPOConfig):
            raise ValueError(f"BuPOTrainer needs args=BuPOConfig(...), got {type(args).__name__}")
        if args.internal_steps > 0 and args.loss_type == "vespo":
            raise ValueError("loss_type='vespo' weighs by the sampler's log-probs, which BuPO's internal phase "
                             "cannot compare with pi^k; use dapo/bnpo/grpo/dr_grpo")
        if not (isinstance(args.temperature, int | float) and math.isfinite(args.temperature) and args.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (rollouts sample), got {args.temperature!r}")
        self._bupo_internal = False  # phase of the rollout batch being trained on (decided in generation)
        super().__init__(model, guard_reward_funcs(reward_funcs, reward_timeout), args, *a, **kw)
        self._bupo_layer: int | None = None
        if args.internal_layer is not None:
            if args.internal_layer == "auto":
                raise ValueError("internal_layer='auto' must be resolved to an int before building the trainer "
                                 "(bupo train does it from the analysis)")
            p = parts(_hf_model(self.model, self.accelerator))
            self._bupo_layer = check_layer(args.internal_layer, p.num_layers)
            if not p.adapter.truncatable:
                raise ValueError(f"model_type {p.model.config.model_type!r} cannot run an internal policy by "
                                 "truncation; BuPO supports the families in bupo.internal.supported_model_types()")
        self._bupo_probe: dict[str, torch.Tensor] | None = None
        self._bupo_probe_failed = False
        self._bupo_resumed_loss = 0.0  # the loss summed over the optimizer steps before the resumed checkpoint
        self.bupo_run_extra: dict[str, Any] = {}  # recorded in every checkpoint marker (bupo train: model, data)
        self._bupo_init_switch()

    # ------------------------------------------------------------------------------------------------------------
    # BuPO: the difference to GRPO
    # ------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Generate + score one rollout batch; decides the phase for every update on this batch (never mid-batch)."""
        training = self.model.training
        if training:
            # rollout step s_cur = global_step // optimizer_steps_per_rollout + 1 (1-based, like verl's global_steps);
            # internal iff s_cur <= s_inter. global_step is restored on resume, so the phase is too.
            self._bupo_internal = self._bupo_decide_phase()
        self._set_phase_flags(training and self._bupo_internal)
        try:
            # rollouts come from the full model (generate runs outside the internal-policy context); the old
            # log-probs computed in here go through _get_per_token_logps_and_entropies, i.e. pi^k_old when internal
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._set_phase_flags(self._bupo_internal)  # an eval call must not leak its flags into training
        if training:
            self._bupo_after_rollout(output)
            self._monitor_rollout(output)
        return output

    # ------------------------------------------------------------------------------------------------------------
    # issue 16: which policy a rollout step trains - fixed s_inter, the adaptive switch or the progressive schedule
    # ------------------------------------------------------------------------------------------------------------

    def _bupo_init_switch(self) -> None:
        from bupo.training.switch import SwitchRule, parse_schedule

        args = self.args
        self._bupo_switch: SwitchRule | None = None
        self._bupo_schedule: list[tuple[int, int]] | None = None
        self._bupo_last_reward = float("nan")
        if args.internal_steps <= 0:
            return
        if args.internal_switch == "auto":
            self._bupo_switch = SwitchRule(cap=args.internal_steps, logp_drop=args.internal_switch_tolerance,
                                           kl_rise=args.internal_switch_kl_rise)
        elif args.internal_schedule is not None:
            self._bupo_schedule = parse_schedule(args.internal_schedule)
            n = parts(_hf_model(self.model, self.accelerator)).num_layers
            for k, _ in self._bupo_schedule:
                check_layer(k, n)

    def _bupo_decide_phase(self) -> bool:
        """Whether the rollout batch about to be generated trains pi^k; sets the layer for a schedule.

        Rollout step s = global_step // optimizer_steps_per_rollout + 1. Fixed and scheduled phases follow from s
        alone (global_step is restored on resume); the adaptive switch decides from all-reduced probe signals, so
        every rank decides alike, and its state is restored from the checkpoint's bupo_switch.json.
        """
        from bupo.training.switch import SwitchDecision, schedule_layer

        args = self.args
        step = self.state.global_step // args.optimizer_steps_per_rollout + 1
        if self._bupo_schedule is not None:
            layer = schedule_layer(self._bupo_schedule, step)
            if layer is not None:
                self._bupo_layer = layer
            return layer is not None
        rule = self._bupo_switch
        if rule is None:
            return args.is_internal(self.state.global_step)
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
        rewards = self._metrics["train"].get("reward")
        if rewards:
            self._bupo_last_reward = float(rewards[-1])  # TRL's mean over the gathered rewards: the same on all ranks
        if self._bupo_switch is not None and not self._bupo_switch.trace and self._bupo_layer is not None:
            if self._bupo_probe is None:
                self._bupo_probe = self._make_probe(output)
            step = self.state.global_step // self.args.optimizer_steps_per_rollout + 1
            signals = self._bupo_signals(step, reward=float("nan"))
            if signals is not None:
                self._bupo_switch.update(signals)  # the baseline (rollout step 1 is always internal)

    @torch.no_grad()
    def _bupo_signals(self, step: int, reward: float | None = None):
        """Signals of :class:`bupo.training.switch.SwitchSignals` on the fixed probe batch, all-reduced (mean).

        One no-grad forward of the full model over the probe with layer k's residual stream captured.
        """
        from trl.models import unwrap_model_for_generation

        from bupo.internal import Projector, capture_streams
        from bupo.training.switch import SwitchSignals

        dev = self.accelerator.device
        probe = {k: v.to(dev) for k, v in self._bupo_probe.items()}
        pos = probe["positions"]
        k = self._bupo_layer
        try:
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gather_deepspeed3_params=True) as unwrapped:
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

    def _set_phase_flags(self, internal: bool) -> None:
        # vLLM's importance-sampling correction and off-policy masking compare the trained policy's old log-probs with
        # the sampler's (full model) log-probs: with pi^k that ratio is pi^k / pi, not engine mismatch, so both are
        # off for internal batches (the official code had TIS off too). TRL reads both attributes at generation and
        # at loss time.
        self.vllm_importance_sampling_correction = self.args.vllm_importance_sampling_correction and not internal
        self.off_policy_mask_threshold = None if internal else self.args.off_policy_mask_threshold

    def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> tuple:
        """log pi(o_t | s_t) for TRL; while internal: log pi^k, by the model's own forward truncated after layer k.

        Covers the old log-probs (no-grad, pre-update weights), the trained log-probs and, with beta > 0, the
        reference (the reference model's layer-k policy). Eval (model.eval()) always uses the full policy.
        """
        if not (self._bupo_internal and self.model.training):
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        else:
            with internal_policy(_hf_model(model, self.accelerator), self._bupo_layer, self.args.internal_projection):
                out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # monitoring (no effect on the updates)
    # ------------------------------------------------------------------------------------------------------------

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
        n_per = args.optimizer_steps_per_rollout
        rollout_index = self.state.global_step // n_per  # 0-based
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
                self._run_probe()

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
        from trl.models.utils import disable_gradient_checkpointing

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        compute = super()._get_per_token_logps_and_entropies  # the unwrapped GRPO method: full policy
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self._bupo_internal:
                _, ent, _ = compute(self.model, ids, mask, keep, batch_size=self.args.per_device_train_batch_size,
                                    compute_entropy=True)
                which = "full"
            else:
                with internal_policy(_hf_model(self.model, self.accelerator), self._bupo_layer,
                                     self.args.internal_projection):
                    _, ent, _ = compute(self.model, ids, mask, keep,
                                        batch_size=self.args.per_device_train_batch_size, compute_entropy=True)
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
    def _run_probe(self) -> None:
        """bupo/layer_entropy/L{k} (0-based k; resid_post of every layer, projection as configured) and /final."""
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

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints: written into a staging folder and renamed into place once complete (a kill mid-save leaves no
    # torn checkpoint-N); the phase is recomputed from global_step; the probe batch is saved so curves stay continuous
    # ------------------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_bupo_staging", False) else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        from bupo.io import atomic_write_json

        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a kill left behind
            os.makedirs(staging, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._bupo_staging = True  # TRL and transformers write every file (all ranks) under the staging folder
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._bupo_staging = False
        folder = os.path.join(staging, name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self._bupo_probe is not None:
                torch.save(self._bupo_probe, os.path.join(folder, PROBE_FILE))
            if self._bupo_switch is not None:  # issue 16: the switch must survive a resume
                atomic_write_json(os.path.join(folder, SWITCH_FILE),
                                  {**self._bupo_switch.state_dict(),
                                   "last_reward": None if self._bupo_last_reward != self._bupo_last_reward
                                   else self._bupo_last_reward})
            pending = getattr(self, "_tr_loss", None)  # the loss since the last log (transformers' accumulator)
            loss_sum = (self._bupo_resumed_loss + getattr(self, "_total_loss_scalar", 0.0)
                        + (float(pending.item()) if pending is not None else 0.0))
            files = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                     if os.path.isfile(os.path.join(folder, f))}
            for f in files:  # durable before the rename makes the checkpoint visible
                with open(os.path.join(folder, f), "rb") as fh:
                    os.fsync(fh.fileno())
            marker = {"global_step": self.state.global_step, "train_loss_sum": loss_sum, "files": files,
                      "run": {**self.bupo_run_identity(), **self.bupo_run_extra}}
            atomic_write_json(os.path.join(folder, CHECKPOINT_MARKER), marker)  # written last
            final = os.path.join(run_dir, name)
            if os.path.exists(final):  # saving the same step again (a resumed run): replace it
                os.replace(final, os.path.join(staging, name + ".old"))
            os.replace(folder, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from bupo.training.launcher import fsdp2_optimizer_resume  # no AdamW state above k while internal

        with _cpu_map_location(self.args.device), fsdp2_optimizer_resume():
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, PROBE_FILE)):
            self._bupo_probe = torch.load(os.path.join(checkpoint, PROBE_FILE), weights_only=True)
        if checkpoint is not None and self._bupo_switch is not None:
            import json

            path = os.path.join(checkpoint, SWITCH_FILE)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {SWITCH_FILE}: it was not saved by an internal_steps='auto' "
                                 "run, so the adaptive switch cannot resume from it")
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            self._bupo_switch.load_state_dict(state)
            last = state.get("last_reward")
            self._bupo_last_reward = float("nan") if last is None else float(last)
        if checkpoint is not None:
            marker = read_checkpoint_marker(checkpoint)
            self._bupo_resumed_loss = float(marker.get("train_loss_sum", 0.0)) if marker else 0.0

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> Any:
        # transformers divides the loss summed over THIS segment by global_step; add the resumed part so that
        # train_loss covers the whole run
        self._total_loss_scalar += self._bupo_resumed_loss
        if hasattr(self, "_initial_global_step"):  # transformers >= 5.18 divides by the steps of THIS segment only
            self._initial_global_step = 0
        return super()._finalize_training(trial, num_train_samples, start_time)

    def bupo_run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (bupo train adds model and data)."""
        return {"internal_layer": self._bupo_layer, "internal_steps": self.args.internal_steps,
                "internal_projection": self.args.internal_projection,
                "optimizer_steps_per_rollout": self.args.optimizer_steps_per_rollout}

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """README.md that says BuPO (k, s_inter, projection, evals, citation); see :mod:`bupo.training.card`."""
        from bupo.training.card import write_model_card

        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    @property
    def bupo_internal(self) -> bool:
        """Whether the rollout batch currently trained on uses the internal policy."""
        return self._bupo_internal
