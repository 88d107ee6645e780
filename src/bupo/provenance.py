"""Where a result came from: the versions that made it, and fingerprints of what went in (resume keys).

- :func:`versions`: ``{package: version}``, recorded in every summary, run record and model card.
- :func:`fingerprint`: a short, stable hash of text or of any JSON-able value (dict keys sorted), e.g. the
  settings a resumed run must share with the run it continues (:class:`bupo.io.Staging`).
- :func:`model_fingerprint`: a cheap identity of a model's current weights (no pass over every element).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_PACKAGES = ("bupo", "torch", "transformers")


def versions(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """The version of each of ``packages`` that is installed (a missing one is left out): an imported module's own
    ``__version__`` (what really ran, also from a source checkout), else the installed distribution's."""
    out = {}
    for name in packages:
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        out[name] = str(version)
    return out


def fingerprint(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj``: text and bytes as they are (text UTF-8, lone
    surrogates kept), anything else as its canonical JSON (keys sorted; non-JSON values by ``str``)."""
    if isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
    elif isinstance(obj, bytes):
        data = obj
    else:
        data = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:length]


def model_fingerprint(model: Any) -> str:
    """A cheap identity of a model's current weights (config + strided samples of every parameter), so
    resumed work never mixes results of different checkpoints."""
    import torch

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 65536)
            sample = flat[::step].double()
            h.update(
                f"{name}|{tuple(p.shape)}|{float(sample.sum()):.17g}|{float(sample.abs().sum()):.17g}".encode()
            )
    return h.hexdigest()[:16]


#: what identifies a model across artefacts (an analysis, a run, an evaluation): the fields a reuse must share
IDENTITY_KEYS = ("model_type", "num_layers", "vocab_size")


def model_identity(model: Any, name: str | None = None) -> dict[str, Any]:
    """``{"model", "model_type", "num_layers", "vocab_size"}`` of an HF decoder LM (what an analysis summary records)."""
    from bupo.internal.adapters import parts

    p = parts(model)
    return {"model": name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "model_type": model.config.model_type, "num_layers": p.num_layers,
            "vocab_size": int(p.lm_head.weight.shape[0])}


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when ``recorded`` (an artefact's) and ``current`` (this model's) agree on every :data:`IDENTITY_KEYS`
    both give; else what differs, in words (``num_layers 8 vs 30; vocab_size 100 vs 49152``)."""
    diffs = [f"{k} {recorded[k]} vs {current[k]}" for k in IDENTITY_KEYS
             if recorded.get(k) is not None and current.get(k) is not None and recorded[k] != current[k]]
    return "; ".join(diffs) or None
