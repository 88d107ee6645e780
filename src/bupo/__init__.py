"""bupo: Bottom-up Policy Optimization (arXiv 2512.19673).

Conventions used everywhere in this package:
- layers are 0-based as in the official code: internal layer ``k`` is paper layer ``l = k + 1``;
- entropies are in nats;
- the projection of a hidden state onto the vocabulary is recorded with every output
  (``raw`` = lm_head(h), the paper's; ``final_norm`` = lm_head(final_norm(h)), the logit lens).

The main API is importable from here (``from bupo import BuPOTrainer``); it is loaded on first use, so
``import bupo`` (and ``bupo --help``) imports neither torch nor TRL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it; resolved by __getattr__ on first access
_EXPORTS = {
    "BuPOConfig": "bupo.training.config",
    "BuPOTrainer": "bupo.training.trainer",
    "internal_policy": "bupo.internal.policy",
    "layer_logits": "bupo.internal.policy",
    "layer_logprobs": "bupo.internal.policy",
    "stream_stats": "bupo.internal.streams",
    "analyze": "bupo.analysis.run",
    "evaluate": "bupo.evaluation.core",
}

__all__ = [
    "BuPOConfig", "BuPOTrainer", "__version__", "analyze", "evaluate", "internal_policy", "layer_logits",
    "layer_logprobs", "stream_stats",
]

if TYPE_CHECKING:  # for type checkers and IDEs only
    from bupo.analysis.run import analyze
    from bupo.evaluation.core import evaluate
    from bupo.internal.policy import internal_policy, layer_logits, layer_logprobs
    from bupo.internal.streams import stream_stats
    from bupo.training.config import BuPOConfig
    from bupo.training.trainer import BuPOTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'bupo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
