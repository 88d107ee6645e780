"""The internal-policy core: architecture adapters, internal policies, stream capture, streaming statistics.

Conventions: layer ``k`` is 0-based (paper layer ``k + 1``); entropies in nats; projection ``raw`` (paper:
lm_head(h), no norm) or ``final_norm`` (logit lens), always recorded by the callers in their outputs.
"""

from bupo.internal.adapters import (
    PROJECTIONS,
    Adapter,
    get_adapter,
    parts,
    register_adapter,
    supported_model_types,
)
from bupo.internal.policy import InternalPolicyError, internal_policy, layer_logits, layer_logprobs
from bupo.internal.stats import Projector, TokenStats, token_stats
from bupo.internal.streams import STREAMS, StreamStats, capture_streams, stream_stats, tap

__all__ = [
    "PROJECTIONS",
    "STREAMS",
    "Projector",
    "StreamStats",
    "TokenStats",
    "capture_streams",
    "stream_stats",
    "tap",
    "token_stats",
    "Adapter",
    "InternalPolicyError",
    "get_adapter",
    "internal_policy",
    "layer_logits",
    "layer_logprobs",
    "parts",
    "register_adapter",
    "supported_model_types",
]
