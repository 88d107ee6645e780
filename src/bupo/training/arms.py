"""Control arms beside BuPO and GRPO, each one ``BuPOConfig`` option (so one ``bupo train`` flag):

- ``layers-only`` (``internal_objective="full"``): for the first s_inter rollout steps the *full* policy's GRPO
  objective J_GRPO (Eq. 3), but only what BuPO's internal phase trains takes gradients and steps: embeddings,
  decoder layers 0..k, lm_head (and the final norm under projection ``final_norm``); then ordinary GRPO. Against
  BuPO it separates "which parameters" from "which policy" (BuPO: the same parameters, J_IPA on pi^k, Eq. 9).
  The layers above k (and, projection ``raw``, the final norm) get ``requires_grad = False`` while internal (no
  gradient, so none in the clipped gradient norm, as under BuPO where they are not in the graph) and the
  optimizer groups of :mod:`bupo.training.optim` hold them exactly as in BuPO's internal phase.
- ``one-layer`` (``train_layer=j``, ``"middle"`` = L // 2, 0-based): GRPO that trains decoder layer j only, every
  other parameter frozen (``requires_grad = False`` before the optimizer is built, so it holds layer j alone), as in
  "Is One Layer Enough?" (arXiv 2607.01232).
- ``random-reward`` (``random_reward=p``): GRPO whose rewards are Bernoulli(p) draws, independent of the completion,
  seeded (:class:`RandomReward`); p = the base model's measured accuracy in ``bupo reproduce``. The spurious-reward
  control of arXiv 2506.10947. A reward callable like any other: the trainer code is unchanged.

``ARMS`` names the arms ``bupo reproduce --arms`` knows and what each sets.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from torch import nn

#: the arms of ``bupo reproduce --arms``: name -> (bupo train algo, whether it has an internal phase)
ARMS: dict[str, tuple[str, bool]] = {
    "grpo": ("grpo", False),
    "bupo": ("bupo", True),
    "layers-only": ("bupo", True),
    "one-layer": ("grpo", False),
    "random-reward": ("grpo", False),
}
OBJECTIVES = ("layer", "full")  # internal_objective: J_IPA on pi^k (BuPO) or J_GRPO (layers-only)


def parse_arms(text: str) -> list[str]:
    """``"grpo,bupo,one-layer"`` -> the arm names in :data:`ARMS` order; ValueError (one line) otherwise."""
    names = [a.strip() for a in str(text).split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise ValueError(f"--arms: unknown arm(s) {unknown or [text]}; accepted, comma-separated: {', '.join(ARMS)}")
    if "grpo" not in names:
        raise ValueError("--arms must include grpo: every arm's paired 95% CI is against GRPO")
    return [a for a in ARMS if a in names]


def arm_of(config: Any) -> str:
    """The arm a resolved config trains (``grpo`` / ``bupo`` / ``layers-only`` / ``one-layer`` / ``random-reward``;
    ``+random-reward`` appended when a random reward is combined with another arm)."""
    if config.train_layer is not None:
        arm = "one-layer"
    elif config.internal_steps > 0:
        arm = "layers-only" if config.internal_objective == "full" else "bupo"
    else:
        arm = "grpo"
    if config.random_reward is not None:
        arm = "random-reward" if arm == "grpo" else f"{arm}+random-reward"
    return arm


# ---------------------------------------------------------------------------------------------------------------
# random-reward


class RandomReward:
    """A TRL reward callable scoring each completion 1.0 with probability ``p`` and 0.0 otherwise, whatever it says.

    Draw ``i`` of a call is a function of (``seed``, the trainer's ``global_step``, the process rank, the call's
    index within that step, ``i``) only: a rerun, or a resume from a checkpoint, draws the same rewards.
    """

    def __init__(self, p: float, seed: int = 0) -> None:
        check_probability(p)
        self.p, self.seed = float(p), int(seed)
        self.__name__ = "random_reward"  # TRL logs rewards/<__name__>
        self._step: int | None = None
        self._calls = 0

    def __call__(self, prompts: list[Any] | None = None, completions: list[Any] | None = None,
                 **kwargs: Any) -> list[float]:
        state = kwargs.get("trainer_state")
        step = int(getattr(state, "global_step", -1))
        if step != self._step:
            self._step, self._calls = step, 0
        call = self._calls
        self._calls += 1
        rank = os.environ.get("RANK", "0")
        n = len(completions if completions is not None else prompts or [])
        return [1.0 if _uniform(self.seed, step, rank, call, i) < self.p else 0.0 for i in range(n)]


def _uniform(*key: Any) -> float:
    """A uniform draw in [0, 1) determined by ``key`` (64 bits of SHA-256; no global random state)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def check_probability(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"random_reward must be a probability in [0, 1] (the base model's accuracy), got {p!r}")


def with_random_reward(reward_funcs: Any, config: Any) -> Any:
    """``reward_funcs`` as given, or - ``config.random_reward`` set - one :class:`RandomReward` in their place,
    seeded by ``config.seed``."""
    if config.random_reward is None:
        return reward_funcs
    return [RandomReward(config.random_reward, seed=config.seed)]


# ---------------------------------------------------------------------------------------------------------------
# one-layer and layers-only: which parameters take gradients


def resolve_train_layer(value: int | str, num_layers: int) -> int:
    """``train_layer`` as a 0-based decoder layer: an int in 0..L-1, or ``"middle"`` = L // 2."""
    j = num_layers // 2 if value == "middle" else value
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < num_layers:
        raise ValueError(f"train_layer must be a 0-based decoder layer in 0..{num_layers - 1} or 'middle' "
                         f"(= {num_layers // 2}), got {value!r}")
    return j


def freeze_all_but_layer(model: nn.Module, layer: int) -> list[str]:
    """``requires_grad = False`` for every parameter outside decoder layer ``layer``; returns the names left
    trainable. Gradient checkpointing then needs the embeddings' output to require grad
    (``enable_input_require_grads``), which the caller turns on when it checkpoints."""
    from bupo.internal import parts

    keep = {id(q) for q in parts(model).layers[layer].parameters()}
    trainable = []
    for name, q in model.named_parameters():
        q.requires_grad_(id(q) in keep)
        if id(q) in keep:
            trainable.append(name)
    return trainable


def freeze_above(model: nn.Module, levels: dict[int, int], k: int) -> list[nn.Parameter]:
    """``requires_grad = False`` for the trainable parameters whose level (:func:`bupo.training.optim.layer_levels`)
    is above k - the layers above k and, projection ``raw``, the final norm; returns them (to thaw later)."""
    frozen = [q for q in model.parameters() if q.requires_grad and levels.get(id(q), -1) > k]
    for q in frozen:
        q.requires_grad_(False)
    return frozen
