"""Full parameters for the forwards ``bupo train`` runs outside TRL's training step.

Under DeepSpeed ZeRO-3 every process holds a shard of each weight (``from_pretrained`` partitions them already,
before the trainer exists), so a plain forward fails (``'weight' must be 2-D``). :func:`full_params` wraps the
pre-flight health check, the auto-layer analysis and the in-training evaluation; it is a no-op without ZeRO-3.
Every process must enter it (gathering is collective), even where only the main one then runs the forward. On exit
FSDP2's units are sharded again (:func:`bupo.internal.sharding.outside_step`: a forward without a backward leaves
the root unit's parameters unsharded, which TRL's vLLM weight sync cannot read).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def full_params(model: Any, accelerator: Any = None) -> Iterator[Any]:
    """Yield ``model`` with its full parameters for a read-only forward, and shard them again afterwards.

    ``accelerator``: the trainer's, for a model it prepared (``trainer.model_wrapped``): TRL's
    ``unwrap_model_for_generation`` then unwraps it, gathers ZeRO-3 weights and lifts DeepSpeed's hooks.
    Without it: :func:`bupo.internal.sharding.gathered_model` (the one gathering helper: ZeRO-3 partitions
    gathered, FSDP2 and plain models unchanged).
    """
    from bupo.internal.sharding import gathered_model, outside_step

    if accelerator is not None:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped, outside_step(unwrapped):
            yield unwrapped
        return
    with gathered_model(model) as full, outside_step(full):
        yield full
