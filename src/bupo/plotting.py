"""Figures for every report (analysis, evaluation, demo, reproduce): matplotlib with the Agg backend, saved atomically.

``pyplot()`` imports matplotlib only when a figure is drawn (``bupo --help`` and the library stay light);
``save_figure(fig, path)`` lays the figure out, writes it via a temporary file (a half-written figure never
appears under ``path``) and closes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save ``fig`` atomically (format from ``path``'s suffix) at 110 dpi and close it; returns ``path``."""
    from bupo.io import atomic_path

    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)  # the temp path keeps the suffix, so the format follows path
    finally:
        pyplot().close(fig)
    return path
