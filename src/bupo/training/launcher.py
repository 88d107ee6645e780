"""The launcher a training runs under: FSDP2 on CPU processes, and what bupo_run.json records about the sharding.

accelerate enables FSDP only for accelerator devices (CUDA, XPU, NPU, ...): on a machine without one, an FSDP
config puts each process in ``MULTI_CPU`` (DDP over gloo) and drops the FSDP plugin. PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) itself runs on CPU ranks over gloo, so :func:`enable_cpu_fsdp2` makes
accelerate keep the plugin there: the state is promoted from ``MULTI_CPU`` to ``FSDP`` exactly where accelerate does
it for GPUs, and ``Accelerator.prepare`` then wraps the model as it does on GPUs (``fully_shard`` per decoder
layer, the embedding and the [final norm, lm_head] tail as their own units, the root last; DTensor parameters).
FSDP1 and DeepSpeed have no CPU path in accelerate: such a launcher on CPU processes is refused in one line.

Under FSDP2, :func:`complete_fused_lm_head` makes TRL's fused LM head run lm_head's forward. TRL 1.16 computes the
training and old log-probs from ``lm_head.weight`` directly (``trl.trainer.utils.add_fused_lm_head``: no logits
tensor), never calling ``lm_head``; accelerate puts lm_head in one FSDP2 unit with the final norm (and, tied, the
embedding), so that unit's forward never completes: torch <= 2.12 warns "1 of the 2 modules passed to fully_shard
did not run forward before backward ... [lm_head]" at every backward, in both BuPO phases, and torch 2.13 completes
the unit late, from the root's post-forward. The weight itself is read while the unit is unsharded (its final norm
ran first), so the numbers were right; the unit's bookkeeping was not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["complete_fused_lm_head", "enable_cpu_fsdp2", "fsdp2_optimizer_resume", "launched_processes",
           "sharding_summary"]


_WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher (torchrun / accelerate launch, or an MPI launcher) started this one among,
    from its environment; 1 without a launcher."""
    for key in _WORLD_SIZE_ENV:
        try:
            n = int(os.environ.get(key, "1"))
        except ValueError:
            continue
        if n > 1:
            return n
    return 1


def single_process_master_port() -> str | None:
    """A free local port as ``MASTER_PORT`` for a single-process run that sets none (returned), else None.

    With vLLM colocate, TRL and accelerate start a one-rank process group on ``MASTER_PORT``, 29500 when unset: two
    such runs at once (or one next to any other job on 29500) then collide with ``EADDRINUSE``. A launcher of several processes sets the port itself and is left alone.
    """
    if os.environ.get("MASTER_PORT") or launched_processes() > 1:
        return None
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = port = str(s.getsockname()[1])
    return port


def _fsdp2_requested() -> bool:
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def enable_cpu_fsdp2() -> bool:
    """Let accelerate run FSDP2 on CPU processes (gloo) when the launcher asks for FSDP2 and there is no GPU.

    Returns True when it did (idempotent), False when nothing was needed (no FSDP2 asked for, a GPU present, or
    one process). A launcher asking for FSDP1 or DeepSpeed on CPU processes, which accelerate would run as DDP (or
    fail on deep inside), is refused here with one line (ValueError), before any model is loaded. Call before the
    trainer (and so the ``Accelerator``) is built.
    """
    import torch

    if torch.cuda.is_available():
        return False
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true" and not (name == "FSDP" and _fsdp2_requested()):
            raise ValueError(f"the accelerate config asks for {name}, but accelerate did not enable it on CPU "
                             f"processes (it runs {'FSDP1' if name == 'FSDP' else name} only on GPUs); use FSDP2 "
                             "(bupo recipes path fsdp2-cpu) or DDP (bupo recipes path cpu) on the CPU")
    if not _fsdp2_requested() or launched_processes() < 2:
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_bupo_cpu_fsdp2", False):
        return True

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        was_initialized = AcceleratorState._shared_state != {}
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if was_initialized or plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        # what AcceleratorState.__init__ does for MULTI_GPU & co. when an FSDP plugin is given
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin

    __init__._bupo_cpu_fsdp2 = True
    AcceleratorState.__init__ = __init__
    return True


def complete_fused_lm_head(trainer: Any) -> bool:
    """Under FSDP2, run ``lm_head`` on zero rows of the backbone's output inside every fused-head forward of TRL,
    right before TRL reads its weight: the unit holding lm_head then completes its forward like any other.

    Costs one [batch, 0, vocab] matmul. Not done elsewhere: DDP has nothing to complete and under ZeRO-3 the call
    would fetch lm_head once more (TRL gathers it itself). Returns whether it was installed.
    """
    from bupo.internal import parts

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or plugin is None or plugin.fsdp_version != 2:
        return False
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    fused = vars(model).get("forward")  # TRL's _fused_forward, bound to this instance by add_fused_lm_head
    if fused is None or getattr(fused, "_bupo_completes_lm_head", False):
        return False
    p = parts(model)

    def run_head(module: Any, args: Any, output: Any) -> None:
        p.lm_head(output[0][..., :0, :])

    @functools.wraps(fused)
    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused(*args, **kwargs)
        handle = p.backbone.register_forward_hook(run_head)
        try:
            return fused(*args, fused_lm_head=True, **kwargs)
        finally:
            handle.remove()

    forward._bupo_completes_lm_head = True
    model.forward = forward
    return True


@contextlib.contextmanager
def fsdp2_optimizer_resume() -> Iterator[None]:
    """Resume an FSDP2 optimizer whose checkpoint has no state for some parameters, as a fresh AdamW for those.

    A checkpoint saved during the internal phase has no AdamW state for the layers above k and the final norm (no
    gradient, so AdamW never created any). torch's ``set_optimizer_state_dict`` refuses such a state dict by default
    ("Missing optimizer state for parameter ... in checkpoint"); with ``strict=False`` it loads, but its full-state-
    dict path first gives every parameter a placeholder state (``_init_optim_state``: one AdamW step on zero
    gradients) and keeps it where the checkpoint has none: step 1 with zero moments, so the first real update of those
    parameters would be AdamW's step 2 (0.74x a fresh step at betas (0.9, 0.999)). Inside the block accelerate loads
    FSDP2 optimizer state non-strictly and the placeholders (both moments exactly zero, on every rank) are dropped
    afterwards: those parameters start a fresh AdamW at the switch, as in an uninterrupted run. Wrap only the
    optimizer load in it.
    """
    import torch.distributed.checkpoint.state_dict as dcp_sd
    from accelerate.utils import fsdp_utils

    real_options, real_set = fsdp_utils._prepare_sd_options, dcp_sd.set_optimizer_state_dict

    def lenient(fsdp_plugin: Any) -> Any:
        options = real_options(fsdp_plugin)
        return options if options is None else dataclasses.replace(options, strict=False)

    def set_and_drop_placeholders(model: Any, optimizers: Any, *args: Any, **kwargs: Any) -> None:
        real_set(model, optimizers, *args, **kwargs)
        for optimizer in optimizers if isinstance(optimizers, list | tuple) else (optimizers,):
            _drop_placeholder_states(optimizer)

    fsdp_utils._prepare_sd_options, dcp_sd.set_optimizer_state_dict = lenient, set_and_drop_placeholders
    try:
        yield
    finally:
        fsdp_utils._prepare_sd_options, dcp_sd.set_optimizer_state_dict = real_options, real_set


def _drop_placeholder_states(optimizer: Any) -> None:
    """Forget Adam states whose moments are zero everywhere (decided on the full tensor: every rank alike)."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "exp_avg" not in state or "exp_avg_sq" not in state:
                continue
            mass = state["exp_avg"].abs().sum() + state["exp_avg_sq"].abs().sum()
            if isinstance(mass, DTensor):
                mass = mass.full_tensor()
            if float(mass) == 0.0:
                del optimizer.state[param]


def sharding_summary(trainer: Any) -> dict[str, Any]:
    """How the trained model was distributed, for bupo_run.json: ``launcher`` (single / ddp / fsdp2 / fsdp1 /
    deepspeed), ``world_size``, ``device`` and, per launcher, the sharded units and parameter type (FSDP2) or the
    ZeRO stage (DeepSpeed)."""
    import torch

    acc = trainer.accelerator
    dist = str(acc.distributed_type).rsplit(".", 1)[-1]
    out: dict[str, Any] = {"world_size": acc.num_processes, "device": acc.device.type, "distributed_type": dist}
    model = trainer.model_wrapped if getattr(trainer, "model_wrapped", None) is not None else trainer.model
    if trainer.is_fsdp_enabled:
        plugin = acc.state.fsdp_plugin
        out["launcher"] = f"fsdp{plugin.fsdp_version}"
        if plugin.fsdp_version == 2:
            from torch.distributed.fsdp import FSDPModule

            units = [type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)]
            out["fsdp_units"] = len(units)
            out["fsdp_unit_types"] = sorted(set(units))
            out["reshard_after_forward"] = plugin.reshard_after_forward
        param = next(p for p in model.parameters())
        out["param_type"] = type(param).__name__
    elif trainer.is_deepspeed_enabled:
        out["launcher"] = "deepspeed"
        out["zero_stage"] = acc.state.deepspeed_plugin.zero_stage
    else:
        out["launcher"] = "ddp" if acc.num_processes > 1 else "single"
    out["mixed_precision"] = str(acc.mixed_precision)
    out["torch"] = torch.__version__
    return out
