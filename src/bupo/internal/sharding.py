"""Full weights outside a module's forward, under FSDP2 and DeepSpeed ZeRO-3.

A plain or DDP model holds every weight in full. Sharded ones do not, outside the forward of the module that owns
a weight:

- FSDP2 (``torch.distributed.fsdp.fully_shard``): the module attribute is this rank's shard, a ``DTensor``; the
  owning unit's pre-forward all-gathers it and swaps in the full tensor until the unit reshards. A matmul of a
  plain tensor with the shard fails ("aten.mm.default got mixed torch.Tensor and DTensor").
- ZeRO-3: the attribute is an empty partition (``numel() == 0``, the full shape in ``ds_shape``) unless a hook of
  the engine or a ``GatheredParameters`` block has fetched it.

Code that reads a weight itself (the projections of :class:`bupo.internal.Projector`, a norm's gain) does it inside
:func:`full_parameters`, which gathers exactly what is sharded at that moment and restores it on exit; code that
runs a whole model outside its engine (the pre-flight health check, before the trainer exists) uses
:func:`gathered_model`. Both are collectives on sharded models: every rank must enter them in the same order.
Inside a running ZeRO-3 engine forward a partition may be in flight (prefetched for the next module): such code
runs under a full gather (TRL's ``unwrap_model_for_generation``, as bupo's probes do); reading one raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["full_parameters", "full_shape", "gathered_model", "inference", "is_sharded", "outside_step"]


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights may be partial outside a forward (FSDP2-wrapped, or ZeRO-3-partitioned)."""
    fsdp = _fsdp_module_type()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return True
    return any(_zero3(p) for p in model.parameters())


def full_shape(p: torch.Tensor) -> torch.Size:
    """The full shape of a parameter: a DTensor's global shape, a ZeRO-3 partition's ``ds_shape``."""
    return p.ds_shape if _zero3(p) else p.shape


def _owners(root: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """The FSDP2 units (innermost ``FSDPModule`` at or above each module) whose parameters are sharded now."""
    fsdp = _fsdp_module_type()
    if fsdp is None:
        return []
    parent = {child: mod for mod in root.modules() for child in mod.children()}
    owners: list[nn.Module] = []
    for m in modules:
        if not any(_dtensor(p) for p in m.parameters(recurse=False)):
            continue  # unsharded right now (inside the unit's forward) or not FSDP-managed
        unit = m
        while unit is not None and not isinstance(unit, fsdp):
            unit = parent.get(unit)
        if unit is not None and all(unit is not o for o in owners):
            owners.append(unit)
    return owners


@contextlib.contextmanager
def full_parameters(root: nn.Module, *modules: nn.Module | None) -> Iterator[None]:
    """Inside the block, the own parameters of ``modules`` (submodules of ``root``) are full tensors on the modules.

    FSDP2: the units owning them are unsharded (``FSDPModule.unshard``) if they are sharded now, and resharded on
    exit; a unit already unsharded (inside its forward) is left alone. ZeRO-3: the partitions not already fetched
    are gathered (``deepspeed.zero.GatheredParameters``, read-only). Plain and DDP models: nothing happens.
    """
    mods = [m for m in modules if m is not None]
    params = [p for m in mods for p in m.parameters(recurse=False)]
    owners = _owners(root, mods)
    zero3 = [p for p in params if _zero3(p)]
    with contextlib.ExitStack() as stack:
        if zero3:
            stack.enter_context(_zero3_gathered(zero3))
        for unit in owners:
            unit.unshard()
            stack.callback(unit.reshard)
        yield


@contextlib.contextmanager
def _zero3_gathered(params: list[torch.Tensor]) -> Iterator[None]:
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if any(p.ds_status == ZeroParamStatus.INFLIGHT for p in params):
        raise RuntimeError("a ZeRO-3 partition bupo reads is being prefetched by a running engine forward; run this "
                           "under a full gather (trl's unwrap_model_for_generation, as bupo's probes do)")
    # unique, and only what is not fetched already: re-partitioning a parameter an active forward fetched (or a
    # tied one gathered twice) would pull it from under that forward
    todo = list({id(p): p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE}.values())
    if not todo:
        yield
        return
    with zero.GatheredParameters(todo, modifier_rank=None):
        yield


@contextlib.contextmanager
def gathered_model(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model with full parameters for a forward outside its engine (e.g. before the trainer wraps it).

    ZeRO-3-partitioned parameters (``zero3_init_flag``: partitioned when loaded) are gathered for the block, as
    TRL's ``unwrap_model_for_generation`` does; an FSDP2-wrapped model needs nothing (its units unshard in their
    own forwards) and neither does a plain one. Yields ``model``.
    """
    zero3 = [p for p in model.parameters() if _zero3(p)]
    if not zero3:
        yield model
        return
    with _zero3_gathered(zero3):
        yield model


@contextlib.contextmanager
def outside_step(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` ready for a forward outside the training step: if ``model`` is itself an FSDP2 unit (the root),
    its own parameters are unsharded for the block (``FSDPModule.unshard``, a collective: every rank enters), and on
    exit every FSDP2 unit in it is sharded again (``FSDPModule.reshard``). Plain, DDP and ZeRO-3 models: nothing.

    The unshard on entry: a forward through a submodule does not run the root's hooks. bupo's probes call the HF model
    inside PEFT's ``PeftModel`` (``get_base_model()``), whose root unit under FSDP2 is the ``PeftModel``: its own
    parameters stayed DTensor shards, and the probe failed with "aten.mul.Tensor got mixed torch.Tensor and DTensor"
    (the layer-entropy probe and the adaptive switch's signals disabled themselves under FSDP2 + LoRA).

    FSDP2's root unit keeps its parameters unsharded after its forward, for the backward that follows in training. A
    no-grad forward bupo runs outside the training step (the probes, the adaptive switch's signals, an evaluation)
    has no backward, so the root's parameters stayed plain full tensors where the next reader expects the sharded
    ``DTensor``: TRL's weight sync into a colocated vLLM engine (``full_tensor()``) then failed with "'Tensor' object
    has no attribute 'full_tensor'" when such a forward came right before a rollout (the adaptive switch's).
    """
    fsdp = _fsdp_module_type()
    if fsdp is not None and isinstance(model, fsdp):
        model.unshard()
    try:
        yield model
    finally:
        if fsdp is not None:
            for m in model.modules():
                if isinstance(m, fsdp):
                    m.reshard()


def inference(model: nn.Module) -> contextlib.AbstractContextManager:
    """The no-grad mode for a read-only pass over ``model``: ``torch.inference_mode()``, but ``torch.no_grad()`` for a
    sharded model (FSDP2, ZeRO-3), as TRL's own generation uses.

    FSDP2 allocates a unit's full-parameter buffers the first time it unshards and reuses them for every later
    forward; allocated under inference mode (an evaluation before the first training step) they are inference
    tensors, and the next training forward's all-gather into them failed with "Inplace update to inference tensor
    outside InferenceMode is not allowed".
    """
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()
