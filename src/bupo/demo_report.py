"""The self-contained HTML report of ``bupo demo`` and ``bupo reproduce``.

Training curves come from each run's ``log_history.json`` (TRL's log plus bupo's ``bupo/*`` metrics), the
entropy-flow figures from the analysis folder, the results from the evaluations. Figures are embedded as base64
PNG: the page has no external links or scripts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

from bupo.analysis.figures import _plt, _save
from bupo.analysis.report import img_tag
from bupo.analysis.run import load_summary
from bupo.io import atomic_write_text

CURVES = [
    ("reward", "mean reward (rollouts)"),
    ("bupo/accuracy", "rollout accuracy"),
    ("bupo/entropy_full", "entropy of the full policy pi_theta (nats)"),
    ("bupo/entropy_internal", "entropy of the internal policy pi^k (nats)"),
]


def _series(log: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in log:
        if key in rec and "step" in rec:
            xs.append(rec["step"])
            ys.append(rec[key])
    return xs, ys


def read_logs(runs: Mapping[str, Path]) -> dict[str, list[dict]]:
    """Each run's ``log_history.json`` (TRL's log plus ``bupo/*``), by label; runs without one are left out."""
    return {label: json.loads((Path(run) / "log_history.json").read_text()) for label, run in runs.items()
            if (Path(run) / "log_history.json").is_file()}


def training_curves(logs: Mapping[str, list[dict]], path: Path) -> Path | None:
    """One panel per curve, one line per run; the internal phase of BuPO runs is shaded."""
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.3))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for label, log in logs.items():
            xs, ys = _series(log, key)
            if xs:
                ax.plot(xs, ys, marker=".", label=label)
            phase_x, phase = _series(log, "bupo/phase")
            internal = [x for x, p in zip(phase_x, phase, strict=True) if p > 0.5]
            if internal:
                ax.axvspan(0, max(internal), color="tab:orange", alpha=0.08)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("training curves (shaded: BuPO's internal phase)", fontsize=10)
    return _save(fig, path)


def layer_probe_curves(logs: Mapping[str, list[dict]], path: Path) -> Path | None:
    """Mean entropy of every layer policy on the fixed probe batch over training (bupo/layer_entropy/L*)."""
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, (label, log) in zip(axes[0], logs.items(), strict=True):
        keys = sorted({k for rec in log for k in rec if k.startswith("bupo/layer_entropy/L")},
                      key=lambda k: int(k.rsplit("L", 1)[1]))
        cmap = plt.get_cmap("viridis", max(len(keys), 1))
        for i, key in enumerate(keys):
            xs, ys = _series(log, key)
            ax.plot(xs, ys, color=cmap(i), label=f"l={int(key.rsplit('L', 1)[1]) + 1}")
        xs, ys = _series(log, "bupo/layer_entropy/final")
        if xs:
            ax.plot(xs, ys, "k--", label="pi_theta")
        ax.set_title(f"{label}: layer-policy entropy on the probe batch", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def markdown_table_to_html(md: str) -> str:
    """The subset of Markdown our tables use: pipe tables, plain lines, '- ' bullets."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        flush()
        if s.startswith("- "):
            out.append(f"<li>{html.escape(s[2:])}</li>")
        elif s:
            out.append(f"<p>{html.escape(s)}</p>")
    flush()
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f5f5f5}"""


def write_report(path: Path, *, title: str, analysis_dir: Path | None, runs: Mapping[str, Path], table_md: str,
                 settings: Mapping, extra_sections: list[tuple[str, str]] | None = None,
                 summary: Mapping | None = None) -> Path:
    """Write the report atomically; returns its path.

    ``summary``: the analysis' ``summary.json`` when the caller already holds it (else read from ``analysis_dir``).
    """
    path = Path(path)
    fig_dir = path.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Conventions: layer k is 0-based as in the official code (paper layer l = k+1); entropies in nats; "
             "projection <code>raw</code> (lm_head of the residual stream, no final norm), as in the paper.</p>",
             "<h2>Results</h2>", markdown_table_to_html(table_md)]
    if summary is None and analysis_dir is not None and (Path(analysis_dir) / "summary.json").is_file():
        summary = load_summary(analysis_dir)
    if analysis_dir is not None and summary is not None:
        parts += ["<h2>Internal entropy flow of the base model</h2>",
                  f"<p>Boundary layer (paper numbering) <b>{summary.get('boundary_layer')}</b> &rarr; suggested "
                  f"internal layer k = <b>{summary.get('suggested_internal_layer')}</b> (0-based). "
                  f"{summary.get('num_samples')} responses, {summary.get('num_tokens')} tokens. Full analysis: "
                  f"<code>{html.escape(str(analysis_dir))}/report.html</code>.</p>"]
        for name in ("entropy_flow", "entropy_change", "layer_entropy", "heatmap"):
            png = Path(analysis_dir) / f"{name}.png"
            if png.is_file():
                parts.append(img_tag(png))
    parts.append("<h2>Training</h2>")
    logs = read_logs(runs)
    for fig in (training_curves(logs, fig_dir / "training_curves.png"),
                layer_probe_curves(logs, fig_dir / "layer_probe.png")):
        if fig is not None:
            parts.append(img_tag(fig))
    for heading, body in extra_sections or []:
        parts += [f"<h2>{html.escape(heading)}</h2>", body]
    parts += ["<h2>Settings</h2><table>"]
    parts += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()]
    parts += ["</table>", "<h3>Runs</h3><ul>"]
    parts += [f"<li>{html.escape(lb)}: <code>{html.escape(str(r))}</code></li>" for lb, r in runs.items()]
    parts += ["</ul></body></html>"]
    return atomic_write_text(path, "\n".join(parts))
