"""BuPO training on TRL's GRPOTrainer: :class:`BuPOConfig`, :class:`BuPOTrainer`, and ``bupo train``.

``bupo train`` from Python, without its command-line parser: build a :class:`BuPOConfig` (and, if needed, a
:class:`BuPOScriptArguments` and TRL's ``ModelConfig``) and call :func:`train`; :func:`run_settings` builds them
with ``bupo train``'s small-run defaults, :func:`parse_train_args` from command-line arguments and a YAML.

Layer ``k`` is 0-based (paper layer ``k + 1``); ``internal_steps`` counts rollout steps; entropies in nats.
Exports are loaded lazily so that ``bupo --help`` (which imports :mod:`bupo.training.cli`) never imports TRL.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuPOConfig", "BuPOScriptArguments", "BuPOTrainer", "GuardedReward", "build_prompt_dataset",
           "load_training_rows", "parse_train_args", "run_settings", "train"]

_WHERE = {
    "BuPOConfig": "bupo.training.config",
    "BuPOScriptArguments": "bupo.training.arguments",
    "parse_train_args": "bupo.training.arguments",
    "run_settings": "bupo.training.arguments",
    "train": "bupo.training.run",
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
