"""Figures of an analysis (matplotlib, Agg backend; PNG). All x axes use paper layers l = 1..L.

- ``entropy_flow.png``: the continuous entropy flow strip (paper Fig. 2): per layer the layer input H(H^{l-1}),
  the attention output H(A^l), the FFN output H(F^l) and the layer output H(H^l), joined by one line.
- ``entropy_change.png``: mean ΔH per layer for attention and FFN (and the whole layer) with 95 % confidence
  intervals, a zero line and the boundary layer marked (paper Fig. 3).
- ``layer_entropy.png``: the layer policies' mean entropy with its CI band, the log|V| ceiling and the final
  policy's entropy.
- ``heatmap.png``: layer x token entropy for one trace; rows strided so that the last layer is always kept,
  tokens mean-pooled into at most ``max_cols`` bins; colours span the 2nd–98th percentile of the cells (nats).

Every function works for any number of layers (1 to hundreds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bupo.plotting import pyplot, save_figure

_COLORS = {"layer": "#e3a21a", "attn": "#d62728", "ffn": "#1f77b4", "final": "#2ca02c"}
#: use the by-sample (cluster-robust) SE for CIs from this many samples on; token-level SE below it
MIN_SAMPLES_FOR_CLUSTER_SE = 5


def stride_rows(num_rows: int, max_rows: int) -> list[int]:
    """Row indices 0..num_rows-1 thinned to at most ``max_rows``, always including the last row."""
    if num_rows < 1 or max_rows < 1:
        raise ValueError(f"num_rows and max_rows must be >= 1, got {num_rows}, {max_rows}")
    if num_rows <= max_rows:
        return list(range(num_rows))
    if max_rows == 1:
        return [num_rows - 1]
    # stride chosen so that the strided rows plus the forced last row fit in max_rows
    step = math.ceil((num_rows - 1) / (max_rows - 1))
    idx = list(range(0, num_rows, step))
    if idx[-1] != num_rows - 1:
        idx.append(num_rows - 1)
    return idx


def pool_columns(mat: np.ndarray, max_cols: int) -> tuple[np.ndarray, int]:
    """Mean-pool the columns of ``mat`` [rows, n] into at most ``max_cols`` bins; returns (pooled, bin width)."""
    n = mat.shape[1]
    width = max(1, math.ceil(n / max_cols))
    if width == 1:
        return mat, 1
    nb = math.ceil(n / width)
    pad = nb * width - n
    padded = np.concatenate([mat, np.full((mat.shape[0], pad), np.nan)], axis=1) if pad else mat
    return np.nanmean(padded.reshape(mat.shape[0], nb, width), axis=2), width


def contain(y: np.ndarray, hw: np.ndarray, margin: float = 0.08) -> tuple[float, float]:
    """y limits holding every bar ``y``, its error bar ``± hw`` and zero, with a ``margin`` fraction to spare."""
    hw = hw if hw.size == y.size else np.zeros_like(y)
    ends = np.concatenate([y - hw, y + hw, [0.0]])
    ends = ends[np.isfinite(ends)]
    lo, hi = float(ends.min()), float(ends.max())
    pad = margin * (hi - lo) or 0.1
    return lo - pad, hi + pad


#: the heatmap's colour scale spans these percentiles of its cells (a few extreme tokens do not flatten the rest)
ROBUST_PERCENTILES = (2.0, 98.0)


def robust_range(mat: np.ndarray) -> tuple[float, float]:
    """(low, high) colour limits: :data:`ROBUST_PERCENTILES` of the finite cells (a small spread when all equal)."""
    vals = np.asarray(mat, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, ROBUST_PERCENTILES))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _arr(xs: Sequence) -> np.ndarray:
    """A summary list -> float64 array, None (no data) -> NaN."""
    return np.array([np.nan if v is None else v for v in xs], dtype=np.float64)


def ci_halfwidth(summary: Mapping, key: str, z: float = 1.96) -> tuple[np.ndarray, str]:
    """Half-width of the 95 % CI of ``summary[key]`` and which SE it used ("sample" or "token")."""
    by_sample = summary.get(f"{key}_se_by_sample")
    if by_sample is not None and summary.get("num_samples", 0) >= MIN_SAMPLES_FOR_CLUSTER_SE:
        se, kind = by_sample, "sample"
    else:
        se, kind = summary.get(f"{key}_se"), "token"
    return z * np.nan_to_num(_arr(se or []), nan=0.0), kind


def _layer_ticks(ax, num_layers: int, max_ticks: int = 24, first: int = 1) -> None:
    """x ticks on paper layers first..num_layers, thinned to at most ``max_ticks``, the last layer always shown."""
    ticks = [first + i for i in stride_rows(num_layers - first + 1, max_ticks)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=8)


def _title(summary: Mapping, what: str) -> str:
    name = Path(str(summary.get("model", ""))).name or str(summary.get("model", ""))
    return f"{what} — {name} ({summary.get('projection')}, ΔH: {summary.get('delta_convention')})"


def _log_v(ax, summary: Mapping) -> None:
    v = summary.get("vocab_size")
    if v:
        ax.axhline(math.log(v), color="grey", ls=":", lw=1, label=f"log|V| = {math.log(v):.2f}")


def plot_flow(summary: Mapping, path: Path) -> Path:
    """The continuous entropy-flow strip (layer input, attention output, FFN output, layer output per layer)."""
    plt = pyplot()
    L = int(summary["num_layers"])
    post = _arr(summary["layer_entropy"])
    pre = np.concatenate([[summary["embed_entropy"]], post[:-1]])
    attn, ffn = _arr(summary["attn_entropy"]), _arr(summary["ffn_entropy"])
    fig, ax = plt.subplots(figsize=(min(7 + 0.3 * L, 30), 4.5))
    xs, ys = [], []
    for i in range(L):
        xs += [i + 0.5, i + 0.5 + 1 / 3, i + 0.5 + 2 / 3, i + 1.5]
        ys += [pre[i], attn[i], ffn[i], post[i]]
    ax.plot(xs, ys, color="0.35", lw=1, zorder=1)
    ms = max(8, 40 - L)
    ax.scatter([i + 0.5 for i in range(L)] + [L + 0.5], list(pre) + [post[-1]], color=_COLORS["layer"], s=ms,
               zorder=2, label=r"layer input / output $H(H^l)$")
    ax.scatter([i + 0.5 + 1 / 3 for i in range(L)], attn, color=_COLORS["attn"], s=ms, zorder=2, label=r"attention output $H(A^l)$")
    ax.scatter([i + 0.5 + 2 / 3 for i in range(L)], ffn, color=_COLORS["ffn"], s=ms, zorder=2, label=r"FFN output $H(F^l)$")
    if summary.get("final_entropy") is not None:
        ax.scatter([L + 0.5 + 0.3], [summary["final_entropy"]], marker="*", s=90, color=_COLORS["final"], zorder=3,
                   label=r"final policy $\pi_\theta$")
    _log_v(ax, summary)
    _layer_ticks(ax, L)
    ax.set_xlim(0.3, L + 1.0)
    ax.set_xlabel("layer l (paper numbering; within a layer: input → attention → FFN → output)", fontsize=9)
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title(_title(summary, "Continuous entropy flow"), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_delta_bars(summary: Mapping, path: Path) -> Path:
    """Mean ΔH per layer (attention, FFN, layer) with 95 % CIs, zero lines and the boundary layer."""
    plt = pyplot()
    L = int(summary["num_layers"])
    x = np.arange(1, L + 1)
    panels = [("attn_entropy_change", "attention ΔH", _COLORS["attn"]),
              ("ffn_entropy_change", "FFN ΔH", _COLORS["ffn"]),
              ("layer_entropy_change", "layer ΔH", _COLORS["layer"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(7 + 0.25 * L, 30), 8.5), sharex=True)
    b = summary.get("boundary_layer")
    for ax, (key, label, color) in zip(axes, panels, strict=True):
        y = _arr(summary[key])
        hw, kind = ci_halfwidth(summary, key)
        ax.bar(x, y, color=color, alpha=0.8, width=0.8)
        ax.errorbar(x, y, yerr=hw if hw.size else None, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.axhline(0.0, color="red", ls="--", lw=1)
        if b:
            ax.axvline(b + 0.5, color="0.3", ls=":", lw=1)
        ax.set_ylim(*contain(y, hw))
        ax.set_ylabel(f"{label} (nats)", fontsize=9)
        ax.set_title(f"{label}, 95% CI ({kind}-level SE)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if b:
        axes[1].annotate(f"boundary layer {b}", xy=(b + 0.5, 0), xytext=(4, 4), textcoords="offset points", fontsize=8)
    _layer_ticks(axes[-1], L)
    axes[-1].set_xlabel("layer l (paper numbering)")
    fig.suptitle(_title(summary, "Entropy change per layer"), fontsize=10)
    return save_figure(fig, path)


def plot_layer_entropy(summary: Mapping, path: Path) -> Path:
    """Mean H(π^l_Layer) per layer with its CI band, the log|V| ceiling and the final policy's entropy."""
    plt = pyplot()
    L = int(summary["num_layers"])
    x = np.arange(0, L + 1)
    y = np.concatenate([[summary["embed_entropy"]], _arr(summary["layer_entropy"])])
    hw, kind = ci_halfwidth(summary, "layer_entropy")
    hw = np.concatenate([[0.0], hw]) if hw.size else np.zeros_like(y)
    fig, ax = plt.subplots(figsize=(min(7 + 0.2 * L, 24), 4.5))
    ax.plot(x, y, "o-", color=_COLORS["layer"], ms=max(2, 6 - L // 20), label=r"layer policy $\pi^l$ ($l = 0$: embedding)")
    ax.fill_between(x, y - hw, y + hw, color=_COLORS["layer"], alpha=0.25, label=f"95% CI ({kind}-level SE)")
    ax.plot(np.arange(1, L + 1), _arr(summary["attn_entropy"]), lw=0.8, color=_COLORS["attn"], alpha=0.7,
            label="attention module policy")
    ax.plot(np.arange(1, L + 1), _arr(summary["ffn_entropy"]), lw=0.8, color=_COLORS["ffn"], alpha=0.7,
            label="FFN module policy")
    if summary.get("final_entropy") is not None:
        ax.axhline(summary["final_entropy"], color=_COLORS["final"], ls="--", lw=1,
                   label=rf"final policy $\pi_\theta$ = {summary['final_entropy']:.3f}")
    _log_v(ax, summary)
    _layer_ticks(ax, L, first=0)
    ax.set_xlim(-0.5, L + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer l (paper numbering)")
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title(_title(summary, "Internal layer policy entropy"), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_heatmap(matrix: np.ndarray, path: Path, *, summary: Mapping | None = None, sample: int = 0,
                 max_rows: int = 48, max_cols: int = 1024) -> Path:
    """Layer x token heatmap of one trace. ``matrix`` [L, n]: row k = H(π^k) of 0-based layer k per token."""
    plt = pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"heatmap matrix must be [layers, tokens] with both >= 1, got shape {m.shape}")
    rows = stride_rows(m.shape[0], max_rows)
    pooled, width = pool_columns(m[rows], max_cols)
    fig, ax = plt.subplots(figsize=(10, min(2 + 0.18 * len(rows), 12)))
    vmin, vmax = robust_range(pooled)
    n = m.shape[1]
    # x in token units (columns may be pooled); y in strided-row units, labelled with paper layers
    im = ax.imshow(pooled, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax,
                   extent=(0, n, -0.5, len(rows) - 0.5))
    ticks = stride_rows(len(rows), 24)  # the last (deepest) plotted layer is always labelled
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(rows[t] + 1) for t in ticks], fontsize=7)
    ax.set_ylabel("layer l (paper numbering)")
    ax.set_xlabel("response token" + (f" (mean over {width} tokens per column)" if width > 1 else ""))
    fig.colorbar(im, ax=ax, extend="both",
                 label=f"entropy (nats)\ncolours: {ROBUST_PERCENTILES[0]:g}–{ROBUST_PERCENTILES[1]:g}th percentile")
    what = f"Layer policy entropy per token, sample {sample}"
    ax.set_title(_title(summary, what) if summary else what, fontsize=10)
    return save_figure(fig, path)


#: every figure make_figures can write, as ``<name>.png``
FIGURES = ("entropy_flow", "entropy_change", "layer_entropy", "heatmap")


def make_figures(summary: Mapping, out_dir: Path, *, heatmap: np.ndarray | None = None,
                 heatmap_sample: int = 0) -> dict[str, Path]:
    """Write all figures (:data:`FIGURES`; the heatmap only when given) into ``out_dir``; returns ``{name: path}``."""
    out_dir = Path(out_dir)
    figs = {
        "entropy_flow": plot_flow(summary, out_dir / "entropy_flow.png"),
        "entropy_change": plot_delta_bars(summary, out_dir / "entropy_change.png"),
        "layer_entropy": plot_layer_entropy(summary, out_dir / "layer_entropy.png"),
    }
    if heatmap is not None:
        figs["heatmap"] = plot_heatmap(heatmap, out_dir / "heatmap.png", summary=summary, sample=heatmap_sample)
    return figs
