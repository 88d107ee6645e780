"""BuPO training on TRL's GRPOTrainer: :class:`BuPOConfig`, :class:`BuPOTrainer`, and ``bupo train``.

Layer ``k`` is 0-based (paper layer ``k + 1``); ``internal_steps`` counts rollout steps; entropies in nats.
Exports are loaded lazily so that ``bupo --help`` (which imports :mod:`bupo.training.cli`) never imports TRL.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuPOConfig", "BuPOTrainer", "GuardedReward", "build_prompt_dataset", "load_training_rows"]

_WHERE = {
    "BuPOConfig": "bupo.training.config",
    "BuPOTrainer": "bupo.training.trainer",
    "GuardedReward": "bupo.training.rewards",
    "build_prompt_dataset": "bupo.training.data",
    "load_training_rows": "bupo.training.data",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'bupo.training' has no attribute {name!r}")
