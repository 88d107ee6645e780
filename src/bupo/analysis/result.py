"""What an analysis leaves: :class:`AnalysisResult` in Python, and the files of its ``out_dir``, read back by
:func:`load_summary` and :func:`suggested_layer`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bupo.analysis.summary import entropy_col

SUMMARY_FILE = "summary.json"  # written last: a folder without it holds an unfinished analysis
TOKENS_FILE = "tokens.parquet"
TRACES_FILE = "traces.jsonl"
REPORT_FILE = "report.html"


@dataclass
class AnalysisResult:
    """What :func:`bupo.analysis.analyze` returns.

    ``summary`` is the dict written to ``summary.json``; ``tokens`` the per-token table (one row per analysed
    position: ``sample``, ``position``, ``response_index``, ``token_id`` and the ``H.*`` / ``logp.*`` / ``top1.*``
    columns, see :mod:`bupo.analysis.summary`), loaded from ``tokens.parquet`` when it is not held in memory.
    """

    summary: dict
    out_dir: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    _tokens: Any = None

    @property
    def tokens(self):
        if self._tokens is None:
            if self.out_dir is None:
                raise ValueError("no per-token data: the analysis was run with keep_tokens=False and no out_dir")
            import pandas as pd

            self._tokens = pd.read_parquet(self.out_dir / TOKENS_FILE)
        return self._tokens

    @property
    def num_layers(self) -> int:
        return int(self.summary["num_layers"])

    @property
    def boundary_layer(self) -> int | None:
        return self.summary["boundary_layer"]

    @property
    def suggested_internal_layer(self) -> int | None:
        return self.summary["suggested_internal_layer"]

    def entropy(self, stream: str, layer: int) -> np.ndarray:
        """Per-token entropies (nats) of ``stream`` at 0-based ``layer``, over all analysed tokens."""
        if stream == "resid_pre" and layer > 0:
            stream, layer = "resid_post", layer - 1
        col = entropy_col(stream, layer)
        if col not in self.tokens:
            raise ValueError(f"no column {col!r}: streams recorded for convention {self.summary['delta_convention']!r}")
        return self.tokens[col].to_numpy(dtype=np.float32)

    def layer_entropy_matrix(self, sample: int) -> np.ndarray:
        """[L, n] per-token layer-policy entropies of one sample (row k = 0-based layer k)."""
        t = self.tokens[self.tokens["sample"] == sample]
        if len(t) == 0:
            raise ValueError(f"sample {sample} has no analysed tokens (skipped or out of range)")
        return layer_matrix(t, self.num_layers)


def layer_matrix(cols: Mapping[str, Any], num_layers: int) -> np.ndarray:
    """[L, n] float32 layer-policy entropies (row k = 0-based layer k) of one sample's token columns."""
    return np.stack([np.asarray(cols[entropy_col("resid_post", k)], dtype=np.float32) for k in range(num_layers)])


def load_summary(path: str | os.PathLike) -> dict:
    """Read ``summary.json`` (``path`` may be the file or the analysis directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    if not p.is_file():
        raise ValueError(f"no analysis summary at {str(p)!r} (run `bupo analyze --out DIR` first)")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(summary, dict) or "num_layers" not in summary:
        raise ValueError(f"{str(p)!r} is not a bupo analyze summary (no 'num_layers')")
    return summary


def suggested_layer(path: str | os.PathLike, *, projection: str | None = None) -> int:
    """The 0-based internal layer ``k`` suggested by an analysis (``summary.json`` or its directory).

    This is ``boundary_layer - 1`` (paper layer -> code index). Raises ValueError, with the analysis' reason and
    the options, when it has no usable boundary layer, or when ``projection`` is given and the analysis was made
    with another one (its boundary describes another policy).
    """
    s = load_summary(path)
    made_with = s.get("projection")
    if projection is not None and made_with is not None and made_with != projection:
        raise ValueError(f"the analysis at {str(path)!r} was made with projection {made_with!r}, but the internal "
                         f"policy uses {projection!r}: its boundary is another policy's. Analyse with "
                         f"`bupo analyze --projection {projection}` (pass it with --analysis), or give --internal-layer K")
    k = s.get("suggested_internal_layer")
    if k is None:
        bd = s.get("boundary") or {}
        note = bd.get("reason") or bd.get("note", "no boundary layer")
        opts = bd.get("options")
        raise ValueError(f"the analysis at {str(path)!r} suggests no internal layer: {note}"
                         + (f". Options: {'; '.join(opts)}" if opts else ""))
    if not isinstance(k, int) or not 0 <= k < int(s["num_layers"]):
        raise ValueError(f"suggested_internal_layer {k!r} in {str(path)!r} is not a layer of a {s['num_layers']}-layer model")
    return k
