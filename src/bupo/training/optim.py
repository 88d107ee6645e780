"""What BuPO's internal phase does not train gets no optimizer step, under every launcher.

While a rollout batch trains pi^k = softmax(lm_head(H^k)) (paper Eq. 5 and 9), the loss depends on the embeddings,
decoder layers 0..k and lm_head only (plus the final norm with projection ``final_norm``): the layers above k - and
the final norm under projection ``raw`` - must stay as they are (Eq. 14-15). How launchers deliver their gradients:

- no launcher, DDP, FSDP2: ``grad is None``; AdamW skips the parameter (no weight decay, no state, no step count);
- DeepSpeed ZeRO-3: zero gradients. AdamW then decays the parameter (p <- p - lr * wd * p) and counts steps, so after
  the switch its moments start from 0 while bias correction uses t = (internal steps) + j at the j-th full step:

      m_t = (1 - b1^j) g,   v_t = (1 - b2^j) g^2,   update = lr * [m_t / (1 - b1^t)] / sqrt(v_t / (1 - b2^t))

  a factor [(1 - b1^j) / (1 - b1^t)] / sqrt[(1 - b2^j) / (1 - b2^t)] away from a fresh AdamW - at the switch.

The same fix for all: :func:`split_groups` gives those parameters param groups of their own (each group tagged with
the lowest layer among its parameters), and :func:`hold_while_internal` hooks the optimizer's step. Before a step on
an internal batch at layer k, every group whose lowest layer is above k loses its gradients (``grad = None``) and
gets lr = weight_decay = 0; after the step both are restored and the group's optimizer state is dropped. So
nothing moves them while internal and their first update after the switch is AdamW's step 1:

      p <- p - lr * wd * p - lr * g / (|g| + eps)        (m_1 / (1 - b1) = g,  v_1 / (1 - b2) = g^2)

The hooks read the groups as the optimizer holds them at step time: DeepSpeed's ZeRO-3 optimizer puts one flat fp32
partition into a group only for the duration of its step (hence the state is dropped inside the step, in the post
hook), FSDP2 puts DTensor shards there; group keys survive both.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bupo.internal import parts

logger = logging.getLogger(__name__)

LEVEL = "bupo_lowest_layer"  # param-group key; a group without it is trained in every phase


def layer_levels(model: nn.Module, projection: str) -> dict[int, int]:
    """``id(parameter) -> level``: i for decoder layer i (0-based), ``num_layers`` for the final norm under projection
    ``raw`` (pi^k skips it). Parameters not listed (embeddings, lm_head, the final norm under ``final_norm``) are
    trained in both phases."""
    p = parts(model)
    levels = {id(q): i for i, layer in enumerate(p.layers) for q in layer.parameters()}
    if projection == "raw":
        levels.update({id(q): p.num_layers for q in p.final_norm.parameters()})
    return levels


def split_groups(optimizer: torch.optim.Optimizer, levels: dict[int, int], layers: Iterable[int]) -> None:
    """Split every param group of a fresh ``optimizer`` at the internal layers ``layers`` (every k the run trains).

    Each group becomes one group per band of levels between consecutive ks (same hyperparameters); the bands above a
    k carry :data:`LEVEL`. The parts trained at every k come first, so group 0 (whose lr the Trainer logs) keeps its
    settings. Empty parts are dropped."""
    if optimizer.state:
        raise ValueError("split the parameter groups before the optimizer's first step")
    bounds = sorted(set(layers))
    bands: dict[int, list[dict[str, Any]]] = {}
    for group in optimizer.param_groups:
        by_band: dict[int, list[torch.Tensor]] = {}
        for q in group["params"]:
            by_band.setdefault(bisect.bisect_left(bounds, levels.get(id(q), -1)), []).append(q)
        for band, params in by_band.items():
            part = {**group, "params": params}
            if band:
                part[LEVEL] = min(levels[id(q)] for q in params)
            bands.setdefault(band, []).append(part)
    optimizer.param_groups = []
    for band in sorted(bands):
        for part in bands[band]:
            optimizer.add_param_group(part)


def hold_while_internal(optimizer: torch.optim.Optimizer, internal_layer: Callable[[], int | None]) -> tuple:
    """Hook ``optimizer.step`` so that groups above the internal layer take no step (see the module docstring).

    ``internal_layer()`` is k while the batch being trained is internal, else None (then the hooks do nothing).
    Returns the two hook handles."""
    saved: list[tuple[dict[str, Any], Any, Any]] = []

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        k = internal_layer()
        if k is None:
            return
        for group in opt.param_groups:
            if group.get(LEVEL, -1) > k:
                for q in group["params"]:
                    q.grad = None  # what DDP/FSDP2 give them: AdamW skips the parameter
                saved.append((group, group["lr"], group.get("weight_decay")))
                group["lr"] = 0.0  # and should an optimizer step it anyway, nothing moves
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        while saved:
            group, lr, wd = saved.pop()
            group["lr"] = lr
            if wd is not None:
                group["weight_decay"] = wd
            for q in group["params"]:
                opt.state.pop(q, None)  # no moments, no step count: the switch starts at AdamW's step 1
            group.pop("step", None)  # optimizers that count steps per group (DeepSpeed's FusedAdam)

    return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)


def hold_layers_above_k(optimizer: Any, model: nn.Module, projection: str, layers: Iterable[int],
                        internal_layer: Callable[[], int | None]) -> bool:
    """:func:`split_groups` by :func:`layer_levels` of ``model`` + :func:`hold_while_internal`; False (with a warning)
    for an optimizer that is not a ``torch.optim.Optimizer``, which is then left as it is."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        logger.warning("bupo: %s is not a torch optimizer: layers above k rely on the launcher's None gradients "
                       "while internal", type(optimizer).__name__)
        return False
    split_groups(optimizer, layer_levels(model, projection), layers)
    hold_while_internal(optimizer, internal_layer)
    return True
