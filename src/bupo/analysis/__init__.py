"""Internal-policy entropy analysis: ``bupo analyze`` / ``bupo analyze compare`` / ``bupo sample`` / ``bupo lens``.

Conventions: 0-based layer ``k`` = paper layer ``k + 1``; entropies in nats; projection ``raw`` (paper) or
``final_norm`` (logit lens); ΔH convention ``bupo`` (paper / official script) or ``residual``.

Exports are resolved lazily so that ``bupo.analysis.cli`` (imported by ``bupo --help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "analyze": "bupo.analysis.run",
    "AnalysisConfig": "bupo.analysis.config",
    "lens_table": "bupo.analysis.lens",
    "format_lens": "bupo.analysis.lens",
    "projection_health": "bupo.analysis.summary",
    "quick_health": "bupo.analysis.health",
    "AnalysisResult": "bupo.analysis.result",
    "load_summary": "bupo.analysis.result",
    "suggested_layer": "bupo.analysis.result",
    "read_traces": "bupo.analysis.traces",
    "boundary_layer": "bupo.analysis.summary",
    "boundary_details": "bupo.analysis.summary",
    "Aggregator": "bupo.analysis.summary",
    "make_figures": "bupo.analysis.figures",
    "render_report": "bupo.analysis.report",
    "compare": "bupo.analysis.compare",
    "sample_layer": "bupo.analysis.sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bupo.analysis' has no attribute {name!r}")
