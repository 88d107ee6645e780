"""``BuPOTrainer``: Bottom-up Policy Optimization (arXiv 2512.19673) on TRL's ``GRPOTrainer`` (trl==1.16.0).

In the paper's notation, with rollouts o_i ~ pi_theta_old (always the FULL model) and group-normalised advantages A_i:

    GRPO (Eq. 3):   J = E[ 1/G sum_i 1/|o_i| sum_t min( r_it A_i, clip(r_it, 1-eps, 1+eps) A_i ) ],
                    r_it = pi_theta(o_it | s_it) / pi_theta_old(o_it | s_it)
    IPA  (Eq. 9):   the same with rho^l_it = pi^l_Layer(o_it | s_it) / pi^l_Layer,old(o_it | s_it),
                    pi^l_Layer = softmax(H^l E_u^T)   (residual stream after layer l, no final norm)
    BuPO (Eq. 10):  J_BuPO = J_IPA while s_cur <= s_inter, J_GRPO afterwards.

So BuPO only changes *which policy's log-probs* TRL computes - for the old (pre-update, no-grad), the new (trained)
and, with beta > 0, the reference log-probs alike - during the first ``internal_steps`` rollout steps. That is this
file: the phase of each rollout batch (:meth:`BuPOTrainer._generate_and_score_completions`) and the log-probs
(:meth:`BuPOTrainer._get_per_token_logps_and_entropies`). pi^k is the model's own forward truncated after layer k
(:func:`bupo.internal.internal_policy`): no compute above k, so the layers above k and (projection ``raw``) the final
norm are not part of the trained policy and must not move (Eq. 14-15); :mod:`bupo.training.optim` makes sure no
optimizer steps them while internal, whatever gradients a launcher hands over (:meth:`BuPOTrainer.create_optimizer`).
Gradients reach embeddings, layers 0..k and lm_head (tied or not).

The control arms (:mod:`bupo.training.arms`) change one thing each: ``internal_objective='full'`` (layers-only)
keeps the internal phase's parameters and optimizer holds but trains the full policy's log-probs
(:meth:`BuPOTrainer._bupo_trains_pik` is then False), ``train_layer`` freezes all but one decoder layer, and
``random_reward`` swaps the reward callables for seeded Bernoulli draws.

Around it, in their own modules: when the internal phase ends (:mod:`bupo.training.adaptive`: fixed s_inter, the
adaptive switch, the progressive schedule), what is logged (:mod:`bupo.training.monitor`) and checkpoints that a kill
cannot tear (:mod:`bupo.training.checkpointing`).

The log-ratio log pi - log pi_old of the loss is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] as the
official code does (verl's ``compute_policy_loss_vanilla``: ``ratio = exp(clamp(negative_approx_kl, -20, 20))``, for
numerical stability); TRL 1.16 does not clamp, and exp overflows float32 past ~88, so one token whose log-prob moved by
that much (raw pi^k puts realised tokens near log-prob -332 on SmolLM2) makes the ratio inf and the gradient NaN.
Outside the clamp a token's ratio is e^{+-20} and it passes no gradient, as in the official code
(:meth:`BuPOTrainer._compute_loss`).

Layer ``k`` is 0-based as in the official code (paper layer k+1). Entropies are in nats. Projection ``raw`` (paper)
or ``final_norm`` (logit lens) per ``BuPOConfig.internal_projection``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from trl import GRPOTrainer

from bupo.internal import internal_policy, parts
from bupo.internal.policy import check_layer
from bupo.training.adaptive import AdaptiveSwitchMixin
from bupo.training.arms import freeze_above, freeze_all_but_layer, resolve_train_layer, with_random_reward
from bupo.training.checkpointing import (
    CHECKPOINT_MARKER,
    PROBE_FILE,
    STAGING_DIR,
    SWITCH_FILE,
    CheckpointMixin,
    checkpoint_problem,
    read_checkpoint_marker,
)
from bupo.training.config import BuPOConfig
from bupo.training.monitor import MonitorMixin
from bupo.training.optim import hold_layers_above_k, layer_levels
from bupo.training.rewards import guard_reward_funcs

__all__ = ["LOG_RATIO_CLAMP", "BuPOTrainer", "CHECKPOINT_MARKER", "PROBE_FILE", "STAGING_DIR", "SWITCH_FILE", "checkpoint_problem",
           "clamp_to_old", "read_checkpoint_marker"]


def _hf_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """The HF model under DDP / DeepSpeed / FSDP1 wrappers (FSDP2 works in place) and PEFT."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


LOG_RATIO_CLAMP = 20.0  # the official code's bound on log pi - log pi_old (verl compute_policy_loss_vanilla)


def clamp_to_old(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """``old + clamp(logps - old, -20, 20)`` where the bound bites, else ``logps`` itself (bit for bit): the log-probs
    whose log-ratio against ``old_logps`` TRL's loss then computes is the official clamped one (value and gradient:
    zero gradient outside the bound)."""
    old = old_logps.to(logps.dtype)
    delta = logps - old
    return torch.where(delta.abs() > LOG_RATIO_CLAMP, old + torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP),
                       logps)


class BuPOTrainer(CheckpointMixin, AdaptiveSwitchMixin, MonitorMixin, GRPOTrainer):
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
        if args.train_layer is not None and args.internal_steps > 0:
            raise ValueError("train_layer (the one-layer arm) is GRPO on one layer: it needs internal_steps = 0 "
                             "(--algo grpo)")
        if args.internal_objective == "full" and args.internal_steps <= 0:
            raise ValueError("internal_objective='full' (the layers-only arm) needs internal_steps > 0 and an "
                             "internal_layer k (--algo bupo)")
        if not (isinstance(args.temperature, int | float) and math.isfinite(args.temperature) and args.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (rollouts sample), got {args.temperature!r}")
        self._bupo_internal = False  # phase of the rollout batch being trained on (decided in generation)
        self._bupo_frozen: list[torch.nn.Parameter] = []  # layers-only: what is frozen while internal
        reward_funcs = with_random_reward(reward_funcs, args)  # the random-reward arm (bupo.training.arms)
        super().__init__(model, guard_reward_funcs(reward_funcs, reward_timeout), args, *a, **kw)
        self._bupo_layer: int | None = None  # k (for a schedule: the current one)
        if args.internal_layer is not None:
            if args.internal_layer == "auto":
                raise ValueError("internal_layer='auto' must be resolved to an int before building the trainer "
                                 "(bupo train does it from the analysis)")
            p = parts(self.bupo_model)
            self._bupo_layer = check_layer(args.internal_layer, p.num_layers)
            if not p.adapter.truncatable:
                raise ValueError(f"model_type {p.model.config.model_type!r} cannot run an internal policy by "
                                 "truncation; BuPO supports the families in bupo.internal.supported_model_types()")
        self._bupo_train_layer = self._freeze_for_one_layer() if args.train_layer is not None else None
        self._init_monitor()
        self._init_checkpointing()
        self._bupo_init_switch()

    def _freeze_for_one_layer(self) -> int:
        """The one-layer arm: decoder layer j alone stays trainable, before the optimizer is built."""
        model = self.bupo_model
        if model is not self.model:
            raise ValueError("train_layer (the one-layer arm) trains one layer of the model itself; it cannot be "
                             "combined with PEFT adapters (drop --use_peft)")
        j = resolve_train_layer(self.args.train_layer, parts(model).num_layers)
        freeze_all_but_layer(model, j)
        if self.args.gradient_checkpointing:  # checkpointed layers need an input that requires grad
            model.enable_input_require_grads()
        return j

    # --- the phase: s_cur <= s_inter (Eq. 10), decided once per rollout batch ---------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Generate + score one rollout batch; decides the phase for every update on this batch (never mid-batch)."""
        training = self.model.training
        if training:
            # rollout step s_cur = global_step // optimizer_steps_per_rollout + 1 (1-based, like verl's global_steps);
            # internal iff s_cur <= s_inter, or as the adaptive switch / the schedule decide (adaptive.py)
            self._bupo_internal = self._bupo_decide_phase()
            self._freeze_for_layers_only()
        self._set_phase_flags(training and self._bupo_trains_pik())
        try:
            # rollouts come from the full model (generate runs outside the internal-policy context); the old
            # log-probs computed in here go through _get_per_token_logps_and_entropies, i.e. pi^k_old when internal
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._set_phase_flags(self._bupo_trains_pik())  # an eval call must not leak its flags into training
        if training:
            self._bupo_after_rollout(output)
            self._monitor_rollout(output)
        return output

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; the layers-only arm's frozen parameters are thawed when it returns or raises."""
        try:
            return super().train(*args, **kwargs)
        finally:
            for q in self._bupo_frozen:
                q.requires_grad_(True)
            self._bupo_frozen = []

    def _bupo_trains_pik(self) -> bool:
        """Whether the batch being trained optimises pi^k (BuPO's internal phase; not the layers-only arm's)."""
        return self._bupo_internal and self.args.internal_objective == "layer"

    def _freeze_for_layers_only(self) -> None:
        """The layers-only arm: while internal, what pi^k does not depend on takes no gradient (requires_grad off,
        as it has none under BuPO, where it is not in the graph); the optimizer groups hold it as for BuPO."""
        if self.args.internal_objective != "full":
            return
        for q in self._bupo_frozen:
            q.requires_grad_(True)
        self._bupo_frozen = []
        if self._bupo_internal:
            model = self.bupo_model
            self._bupo_frozen = freeze_above(model, layer_levels(model, self.args.internal_projection),
                                             self._bupo_layer)

    def _set_phase_flags(self, internal: bool) -> None:
        # vLLM's importance-sampling correction (ratio pi_old / pi_sampler) and off-policy masking compare the trained
        # policy's old log-probs with the sampler's (the full model): for an internal batch that ratio is pi^k / pi,
        # not an engine mismatch, so both are off (the official code had TIS off too). TRL reads both attributes at
        # generation (the ratio is then not even computed) and at loss time.
        self.vllm_importance_sampling_correction = self.args.vllm_importance_sampling_correction and not internal
        self.off_policy_mask_threshold = None if internal else self.args.off_policy_mask_threshold

    # --- the log-probs: log pi^k_theta instead of log pi_theta while internal (Eq. 9) --------------------------

    def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> tuple:
        """log pi(o_t | s_t) for TRL; while internal: log pi^k, by the model's own forward truncated after layer k.

        Covers the old log-probs (no-grad, pre-update weights), the trained log-probs and, with beta > 0, the
        reference (the reference model's layer-k policy). Eval (model.eval()) always uses the full policy.
        """
        if not (self._bupo_trains_pik() and self.model.training):
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        else:
            with internal_policy(_hf_model(model, self.accelerator), self._bupo_layer, self.args.internal_projection):
                out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        old = getattr(self, "_bupo_old_logps", None)
        if old is not None and out[0] is not None and out[0].shape == old.shape:  # inside _compute_loss only
            out = (clamp_to_old(out[0], old), *out[1:])
        return out

    # --- the loss: TRL's, with the official clamp of the log-ratio to [-20, 20] ------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss, its log-ratio log pi - log pi_old clamped to [-20, 20] (the official code; see the module
        docstring). TRL computes the log-ratio from the log-probs this trainer returns and ``old_per_token_logps``
        (absent when TRL skips it: then pi_old = pi detached, the ratio is 1 and there is nothing to clamp), so the
        trained log-probs come back as ``old + clamp(logp - old)``. The clamped log-probs are also what a KL term
        (``beta > 0``, not the paper's) sees, so its gradient stops there too for a token moved by more than 20."""
        self._bupo_old_logps = inputs.get("old_per_token_logps")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._bupo_old_logps = None

    # --- the update: what pi^k does not depend on takes no optimizer step while internal (Eq. 14-15) -----------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """TRL's optimizer, its parameter groups split at k and held while internal (:mod:`bupo.training.optim`).

        DDP and FSDP2 give the layers above k None gradients, DeepSpeed ZeRO-3 zeros: either way they get no weight
        decay and no step count while internal, and their first update after the switch is AdamW's step 1."""
        fresh = self.optimizer is None  # a user-supplied optimizer is used as it is
        optimizer = super().create_optimizer(model)
        layers = self._bupo_internal_layers()
        if fresh and layers:
            hold_layers_above_k(optimizer, _hf_model(self.model if model is None else model, self.accelerator),
                                self.args.internal_projection, layers,
                                lambda: self._bupo_layer if self._bupo_internal else None)
        return optimizer

    # --- public state -----------------------------------------------------------------------------------------

    @property
    def bupo_internal(self) -> bool:
        """Whether the rollout batch currently trained on uses the internal policy."""
        return self._bupo_internal

    @property
    def bupo_phase(self) -> str:
        """``"internal"`` (pi^k is trained) or ``"full"``, for the rollout batch currently trained on."""
        return "internal" if self._bupo_internal else "full"

    @property
    def bupo_layer(self) -> int | None:
        """The internal layer k (0-based; for a schedule the current one); None for GRPO without a layer."""
        return self._bupo_layer

    @property
    def bupo_model(self) -> torch.nn.Module:
        """The HF model being trained, under launcher wrappers and PEFT."""
        return _hf_model(self.model, self.accelerator)

    def bupo_run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (bupo train adds model and data)."""
        return {"internal_layer": self._bupo_layer, "internal_steps": self.args.internal_steps,
                "internal_projection": self.args.internal_projection,
                "optimizer_steps_per_rollout": self.args.optimizer_steps_per_rollout,
                "internal_objective": self.args.internal_objective, "train_layer": self._bupo_train_layer,
                "random_reward": self.args.random_reward}

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """README.md that says BuPO (k, s_inter, projection, evals, citation); see :mod:`bupo.training.card`."""
        from bupo.training.card import write_model_card

        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)
