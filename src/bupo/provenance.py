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
