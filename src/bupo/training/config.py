"""``BuPOConfig``: TRL's ``GRPOConfig`` plus the three BuPO knobs and a few logging options.

Conventions:

- ``internal_layer`` is the 0-based decoder layer ``k`` of the official code (paper layer ``l = k + 1``);
  ``"auto"`` is accepted here and must be resolved (``bupo train`` does it from the analysis) before a trainer
  is built.
- ``internal_steps`` is s_inter, counted in **rollout steps** (one step = one generation batch), like the
  official ``global_steps <= iterative_steps`` with ``global_steps`` counted from 1: rollout steps 1..S are
  trained on the layer-``k`` internal policy, S+1.. on the full policy. ``internal_steps=0`` is plain GRPO.
  TRL's ``max_steps`` / ``save_steps`` / ``logging_steps`` count *optimizer* steps;
  one rollout step = ``steps_per_generation * num_iterations / gradient_accumulation_steps`` optimizer steps
  (:attr:`BuPOConfig.optimizer_steps_per_rollout`).
- ``internal_projection``: ``raw`` = lm_head(h) without the final norm (the paper), ``final_norm`` = logit lens.
- Entropies are in nats.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from bupo.internal.adapters import PROJECTIONS

#: transformers' FutureWarning for the old name of activation checkpointing, which GRPOConfig still sets
CHECKPOINTING_RENAME_WARNING = r"`gradient_checkpointing(_kwargs)?` is deprecated"


def _parse_layer(value: object) -> int | str | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"internal_layer must be an int >= 0 or 'auto', got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto",):
            return "auto"
        if text in ("none", "null", ""):
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"internal_layer must be an int >= 0 (0-based k, paper layer k+1) or 'auto', got {value!r}"
            ) from None
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"internal_layer must be an int >= 0 (0-based k, paper layer k+1) or 'auto', got {value!r}")
    return value


@dataclass
class BuPOConfig(GRPOConfig):
    """GRPOConfig + Bottom-up Policy Optimization (arXiv 2512.19673).

    Every GRPOConfig field keeps its meaning; the BuPO fields are below. See the module docstring for the
    step/layer conventions. With ``internal_steps > 0`` and several processes, ``ddp_find_unused_parameters`` is
    set to True (layers above ``k`` get no gradient during the internal phase and DDP would otherwise hang or
    raise); an explicit False is rejected.
    """

    internal_layer: int | str | None = field(
        default=None,
        metadata={
            "help": "BuPO: the 0-based decoder layer k whose internal policy is optimised first (paper layer k+1), "
            "or 'auto' (bupo train: the boundary layer suggested by the analysis). Required when internal_steps > 0."
        },
    )
    internal_steps: int | str | None = field(
        default=0,
        metadata={
            "help": "BuPO: s_inter, the number of rollout steps (generation batches, counted from 1) trained on the "
            "layer-k internal policy before switching to the full policy. 0 = plain GRPO. 'auto': the adaptive "
            "switch of bupo.training.switch decides, at most internal_steps_max steps (after construction "
            "internal_steps holds that cap and internal_switch='auto')."
        },
    )
    # the adaptive switch and the progressive schedule (bupo.training.switch)
    internal_steps_max: int | None = field(
        default=None,
        metadata={"help": "BuPO, internal_steps='auto': at most this many internal rollout steps (the cap)."},
    )
    internal_switch: str = field(
        default="fixed",
        metadata={"help": "BuPO: 'fixed' (internal_steps rollout steps) or 'auto' (set by internal_steps='auto')."},
    )
    internal_switch_tolerance: float = field(
        default=0.05,
        metadata={"help": "BuPO, internal_steps='auto': switch once the full policy's mean log-prob of the probe "
                  "tokens fell this many nats/token below its rollout-step-1 value (bupo.training.switch)."},
    )
    internal_switch_kl_rise: float = field(
        default=0.01,
        metadata={"help": "BuPO, internal_steps='auto': or switch once KL(pi^k || pi) on the probe rose this many nats "
                  "above its lowest value so far (bupo.training.switch)."},
    )
    internal_switch_rule: str = field(
        default="absolute",
        metadata={"help": "BuPO, internal_steps='auto': 'absolute' (the nats thresholds above) or 'relative' "
                  "(scale-free: the probe's moves against its own step-to-step spread; bupo.training.switch)."},
    )
    internal_switch_noise_factor: float = field(
        default=3.0,
        metadata={"help": "BuPO, internal_switch_rule='relative': switch once the probe log-prob fell, or the KL rose, "
                  "by more than this many times its step-to-step spread over the first internal steps."},
    )
    internal_switch_noise_steps: int = field(
        default=3,
        metadata={"help": "BuPO, internal_switch_rule='relative': the first internal rollout steps that measure the "
                  "probe's spread (no switch before rollout step this + 2)."},
    )
    internal_schedule: str | None = field(
        default=None,
        metadata={
            "help": "BuPO, progressive: 'k1:s1,k2:s2' trains layer k1 (0-based) for s1 rollout steps, then k2 for "
            "s2, then the full policy. Sets internal_layer=k1 and internal_steps=s1+s2+..."
        },
    )
    internal_projection: str = field(
        default="raw",
        metadata={
            "help": "BuPO: how the internal policy reads the residual stream: 'raw' = lm_head(h) (the paper) or "
            "'final_norm' = lm_head(final_norm(h)) (logit lens)."
        },
    )
    # control arms (bupo.training.arms)
    internal_objective: str = field(
        default="layer",
        metadata={
            "help": "BuPO: what the internal rollout steps optimise: 'layer' = J_IPA on pi^k (the paper) or 'full' = "
            "the full policy's GRPO objective with only what the internal phase trains stepped (embeddings, layers "
            "0..k, lm_head): the layers-only arm, 'which parameters' without 'which policy'."
        },
    )
    train_layer: int | str | None = field(
        default=None,
        metadata={
            "help": "One-layer arm (arXiv 2607.01232): GRPO training only this 0-based decoder layer, or 'middle' "
            "(L // 2); every other parameter frozen. Needs internal_steps = 0 (--algo grpo)."
        },
    )
    random_reward: float | None = field(
        default=None,
        metadata={
            "help": "Random-reward arm (spurious-reward control, arXiv 2506.10947): every completion scores 1 with "
            "this probability (the base model's accuracy), else 0, seeded by seed; replaces the reward functions."
        },
    )
    log_policy_entropies: bool = field(
        default=True,
        metadata={
            "help": "Log bupo/entropy_full and bupo/entropy_internal every rollout step. The policy being trained "
            "comes for free from the loss pass (the whole rollout batch); the other one costs one no-grad forward "
            "of policy_entropy_rows of its sequences (the full model during the internal phase, layers 0..k during "
            "the full phase)."
        },
    )
    policy_entropy_rows: int = field(
        default=4,
        metadata={
            "help": "Sequences per process on which the policy NOT being trained has its entropy measured each "
            "rollout step, spread evenly over the rollout batch (so over its prompt groups); 0 = the whole batch. "
            "The whole batch cost 16% of a SmolLM2 rollout step (16 x 256 tokens) on a CPU."
        },
    )
    probe_every: int = field(
        default=10,
        metadata={
            "help": "Every this many rollout steps (and at the first), log bupo/layer_entropy/L{k} (0-based k) "
            "and bupo/layer_entropy/final on a small fixed probe batch. 0 disables."
        },
    )
    probe_size: int = field(
        default=4,
        metadata={"help": "Number of sequences (from the first rollout batch, then frozen) in the probe batch."},
    )
    optimizer_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Global number of completions per optimizer step (verl: ppo_mini_batch_size x n). When set, "
            "gradient_accumulation_steps is derived from it and the world size, so presets stay valid on any "
            "number of processes."
        },
    )

    def __post_init__(self) -> None:
        from bupo.training.launcher import single_process_master_port

        if self.use_vllm and self.vllm_mode == "colocate":  # TRL then starts a one-rank group on MASTER_PORT
            single_process_master_port()  # (before GRPOConfig sets up the devices)
        # the values as given, before this method and GRPOConfig derive any field: what resolved() rebuilds from
        self._given = {f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        self.internal_layer = _parse_layer(self.internal_layer)
        self._resolve_switch()
        if isinstance(self.internal_steps, bool) or not isinstance(self.internal_steps, int) or self.internal_steps < 0:
            raise ValueError(f"internal_steps must be an int >= 0 (rollout steps; 0 = GRPO), got {self.internal_steps!r}")
        if self.internal_projection not in PROJECTIONS:
            raise ValueError(
                f"internal_projection must be one of {', '.join(PROJECTIONS)}, got {self.internal_projection!r}"
            )
        self._check_arms()
        if self.internal_steps > 0 and self.internal_layer is None:
            raise ValueError("internal_steps > 0 needs internal_layer (0-based k) or internal_layer='auto'")
        for name in ("probe_every", "probe_size", "policy_entropy_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.optimizer_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise ValueError(
                "give either optimizer_batch_size or gradient_accumulation_steps, not both "
                f"(got {self.optimizer_batch_size} and {self.gradient_accumulation_steps})"
            )
        derive_generation = self.generation_batch_size is None and self.steps_per_generation is None
        with warnings.catch_warnings():
            # GRPOConfig sets gradient_checkpointing, which transformers 5 renamed activation_checkpointing and warns
            # about on every config; the value carries over unchanged, so that one warning is noise here
            warnings.filterwarnings("ignore", message=CHECKPOINTING_RENAME_WARNING, category=FutureWarning)
            super().__post_init__()

        if self.optimizer_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.world_size
            if self.optimizer_batch_size % per_step != 0:
                raise ValueError(
                    f"optimizer_batch_size ({self.optimizer_batch_size}) must be a multiple of "
                    f"per_device_train_batch_size x world_size = {self.per_device_train_batch_size} x "
                    f"{self.world_size} = {per_step}"
                )
            self.gradient_accumulation_steps = self.optimizer_batch_size // per_step
            if derive_generation:  # GRPOConfig's default: one optimizer step per generation batch
                self.steps_per_generation = self.gradient_accumulation_steps
                self.generation_batch_size = per_step * self.steps_per_generation

        # One optimizer step must never mix two rollout batches (the phase is decided per rollout batch).
        micro_per_rollout = self.steps_per_generation * self.num_iterations
        if micro_per_rollout % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation x num_iterations ({self.steps_per_generation} x {self.num_iterations}) must be "
                f"a multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps}), so that every "
                "optimizer step uses one rollout batch only"
            )

        if self.internal_steps > 0:
            if self.world_size > 1:
                if self.ddp_find_unused_parameters is False:
                    raise ValueError(
                        "BuPO's internal phase leaves the layers above k without gradients, which DDP only accepts "
                        "with ddp_find_unused_parameters=True; do not set it to False"
                    )
                self.ddp_find_unused_parameters = True
            # a checkpoint inside a rollout batch would resume with a batch that straddles the phase switch
            n = self.optimizer_steps_per_rollout
            if self.save_strategy == "steps" and self.save_steps >= 1 and int(self.save_steps) % n != 0:
                raise ValueError(
                    f"save_steps ({self.save_steps}) must be a multiple of the optimizer steps per rollout step "
                    f"({n}) so that checkpoints (and --resume) fall on rollout-step boundaries"
                )

    def _check_arms(self) -> None:
        """The control arms' options (bupo.training.arms), one line each."""
        from bupo.training.arms import OBJECTIVES, check_probability

        if self.internal_objective not in OBJECTIVES:
            raise ValueError(f"internal_objective must be one of {', '.join(OBJECTIVES)}, got {self.internal_objective!r}")
        if isinstance(self.train_layer, str):
            text = self.train_layer.strip().lower()
            self.train_layer = text if text == "middle" else (int(text) if text.lstrip("-").isdigit() else text)
        if self.train_layer is not None:
            j = self.train_layer
            if j != "middle" and (isinstance(j, bool) or not isinstance(j, int) or j < 0):
                raise ValueError(f"train_layer must be a 0-based decoder layer (int >= 0) or 'middle', got {j!r}")
        if self.random_reward is not None:
            check_probability(self.random_reward)

    def _resolve_switch(self) -> None:
        """internal_steps 'auto' -> internal_switch='auto' + the cap; a schedule -> its layer and steps."""
        from bupo.training.switch import parse_schedule

        steps = self.internal_steps
        if isinstance(steps, str):
            text = steps.strip().lower()
            if text == "auto":
                steps = "auto"
            else:
                try:
                    steps = int(text)
                except ValueError:
                    raise ValueError(f"internal_steps must be an int >= 0 (rollout steps; 0 = GRPO) or 'auto', "
                                     f"got {self.internal_steps!r}") from None
        cap = self.internal_steps_max
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"internal_steps_max must be an int >= 1 (rollout steps), got {cap!r}")
        if self.internal_switch_rule not in ("absolute", "relative"):
            raise ValueError(f"internal_switch_rule must be 'absolute' or 'relative', got {self.internal_switch_rule!r}")
        if self.internal_switch not in ("fixed", "auto"):
            raise ValueError(f"internal_switch must be 'fixed' or 'auto', got {self.internal_switch!r}")
        if steps == "auto":
            if cap is None:
                raise ValueError("internal_steps='auto' needs internal_steps_max (the most internal rollout steps, "
                                 "e.g. --internal-steps-max 12)")
            self.internal_switch, steps = "auto", cap
        elif self.internal_switch == "auto" and isinstance(steps, int) and steps > 0 and cap is None:
            self.internal_steps_max = steps  # a config saved after construction: internal_steps is the cap
        if self.internal_schedule is not None:
            if self.internal_switch == "auto":
                raise ValueError("internal_schedule and internal_steps='auto' exclude each other; give one")
            schedule = parse_schedule(self.internal_schedule)
            self.internal_layer, steps = schedule[0][0], sum(s for _, s in schedule)
        self.internal_steps = steps

    def resolved(self, **changes: Any) -> BuPOConfig:
        """A new config built from the values this one was given, with ``changes`` (``dataclasses.replace``
        semantics), validated by ``__post_init__`` like any other.

        ``dataclasses.replace(self, ...)`` itself cannot be used: it passes back the fields that construction derived
        (``steps_per_generation`` next to ``generation_batch_size``, ``gradient_accumulation_steps`` next to
        ``optimizer_batch_size``), which GRPOConfig and BuPOConfig refuse as given together.
        """
        unknown = sorted(set(changes) - set(self._given))
        if unknown:
            raise TypeError(f"BuPOConfig has no init field(s) {unknown}")
        return type(self)(**{**self._given, **changes})

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimizer steps per rollout (generation) batch."""
        return self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps

    def is_internal(self, global_step: int) -> bool:
        """Whether the rollout batch generated when ``global_step`` optimizer steps are done is trained internally.

        rollout_round_index = global_step // optimizer_steps_per_rollout (0-based), internal iff < internal_steps:
        the official ``global_steps <= iterative_steps`` with 1-based global_steps.
        """
        return global_step // self.optimizer_steps_per_rollout < self.internal_steps
