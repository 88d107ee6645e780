"""``bupo analyze compare``: overlay several analyses on a normalised depth axis (paper: Qwen vs Llama).

Depth of paper layer ``l`` of an ``L``-layer model is ``l / L`` (so the last layer of every model sits at 1.0 and
the embedding at 0.0). Writes ``compare.png`` (entropies in nats, ΔH in nats), ``compare_normalized.png``
(entropy / log|V|; ΔH divided by its run's 90th percentile of |ΔH| over layers, on a symlog axis: the shapes,
whatever the scale — Llama's ΔH is ~50x smaller than Qwen's), ``compare.json`` (one row per run) and a self-contained ``compare.html``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bupo.analysis.figures import _arr
from bupo.analysis.report import _CSS, img_tag
from bupo.analysis.result import load_summary
from bupo.io import atomic_write_json, atomic_write_text
from bupo.plotting import pyplot, save_figure


def _label(summary: dict, path: Path) -> str:
    name = Path(str(summary.get("model", ""))).name or path.name
    return f"{name} ({path.name})" if name != path.name else name


def _plot(runs: list[tuple[str, dict]], path: Path, normalized: bool) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for i, (label, s) in enumerate(runs):
        color = f"C{i % 10}"
        L = int(s["num_layers"])
        depth = np.arange(0, L + 1) / L
        ent = np.concatenate([[s["embed_entropy"]], _arr(s["layer_entropy"])])
        logv = math.log(s["vocab_size"]) if s.get("vocab_size") else None
        if normalized and logv:
            ent = ent / logv
        axes[0].plot(depth, ent, "o-", ms=3, color=color, label=label)
        if not normalized and logv:
            axes[0].axhline(logv, color=color, ls=":", lw=0.8)
        for ax, key in ((axes[1], "attn_entropy_change"), (axes[2], "ffn_entropy_change")):
            y = _arr(s[key])
            if normalized:
                # robust per-run scale: one dominant layer (Llama's last) must not flatten the rest
                scale = np.nanpercentile(np.abs(y), 90) if np.any(np.isfinite(y)) else 0.0
                y = y / scale if scale > 0 else y
            ax.plot(depth[1:], y, "o-", ms=3, color=color, label=label)
        b = s.get("boundary_layer")
        if b:
            axes[2].axvline(b / L, color=color, ls="--", lw=0.8)
    axes[0].set_ylabel("H(π^l) / log|V|" if normalized else "mean H(π^l) (nats)")
    axes[1].set_ylabel("ΔH attention" + (" / p90|ΔH|" if normalized else " (nats)"))
    axes[2].set_ylabel("ΔH FFN" + (" / p90|ΔH|" if normalized else " (nats)"))
    for ax in axes[1:]:
        ax.axhline(0, color="red", ls="--", lw=1)
        if normalized:
            ax.set_yscale("symlog", linthresh=1.0)  # linear within the typical range, log beyond it
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].set_xlabel("normalised depth l / L (0 = embedding, 1 = last layer; dashed: boundary layers)")
    fig.suptitle("Internal policy entropy across models" + (" (normalised)" if normalized else ""), fontsize=11)
    return save_figure(fig, path)


def compare(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> dict:
    """Overlay the analyses in ``dirs`` (each holding a ``summary.json``); returns the ``compare.json`` dict."""
    if len(dirs) < 1:
        raise ValueError("compare needs at least one analysis directory")
    if labels is not None and len(labels) != len(dirs):
        raise ValueError(f"got {len(labels)} labels for {len(dirs)} directories")
    runs = []
    for i, d in enumerate(dirs):
        s = load_summary(d)
        runs.append((labels[i] if labels else _label(s, Path(d)), s))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output directory {str(out)!r} is not writable: {exc.strerror or exc}") from None
    settings = {(s.get("projection"), s.get("delta_convention")) for _, s in runs}
    rows = []
    for (label, s), d in zip(runs, dirs, strict=True):
        L = int(s["num_layers"])
        b = s.get("boundary_layer")
        rows.append({
            "label": label, "dir": str(d), "model": s.get("model"), "num_layers": L,
            "projection": s.get("projection"), "delta_convention": s.get("delta_convention"),
            "num_samples": s.get("num_samples"), "num_tokens": s.get("num_tokens"),
            "boundary_layer": b, "suggested_internal_layer": s.get("suggested_internal_layer"),
            "boundary_depth": None if b is None else b / L, "final_entropy": s.get("final_entropy"),
            "embed_entropy": s.get("embed_entropy"),
        })
    result = {
        "runs": rows,
        "depth_axis": "l / L (paper layer over number of layers)",
        "mixed_settings": len(settings) > 1,
        "note": ("runs differ in projection or ΔH convention: their curves are not directly comparable"
                 if len(settings) > 1 else ""),
    }
    figs = {"compare": _plot(runs, out / "compare.png", normalized=False),
            "compare_normalized": _plot(runs, out / "compare_normalized.png", normalized=True)}
    atomic_write_json(out / "compare.json", result, indent=1, allow_nan=False)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape('–' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v)))}</td>"
                                   for v in r.values()) + "</tr>" for r in rows)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bupo analyze compare</title>'
            f"<style>{_CSS}</style></head><body><h1>Internal policy entropy across models</h1>"
            f"<p>{html.escape(result['note'])}</p><table><tr>{head}</tr>{body}</table>"
            + "".join(f"<h2>{html.escape(n.replace('_', ' '))}</h2>{img_tag(p)}" for n, p in figs.items())
            + "</body></html>")
    atomic_write_text(out / "compare.html", page)
    return result
