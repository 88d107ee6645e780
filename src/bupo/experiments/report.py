"""The self-contained HTML report of ``bupo demo`` and ``bupo reproduce``.

Training curves come from each run's ``log_history.json`` (TRL's log plus bupo's ``bupo/*`` metrics), the
entropy-flow figures from the analysis folder, the results (and the Pass@K curves, the paper's Fig. 6) from the
evaluations. Figures are embedded as base64 PNG and links (analysis report, run folders) are relative, so the folder
can be moved or copied; the page loads nothing external.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path

from bupo.analysis.report import img_tag, math_html
from bupo.analysis.result import load_summary
from bupo.io import atomic_write_text
from bupo.plotting import pyplot, save_figure

CURVES = [
    ("reward", "mean reward of the rollouts", "reward"),
    ("bupo/accuracy", "rollout accuracy", "fraction correct"),
    ("bupo/entropy_full", r"entropy of the full policy $\pi_\theta$", "entropy (nats)"),
    ("bupo/entropy_internal", r"entropy of the internal policy $\pi^k$", "entropy (nats)"),
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


def _run_meta(runs: Mapping[str, Path] | None) -> dict[str, dict]:
    """``bupo_run.json`` of each run (optimizer steps per rollout step, s_inter), by label; {} when absent."""
    out = {}
    for label, run in (runs or {}).items():
        f = Path(run) / "bupo_run.json"
        if f.is_file():
            out[label] = json.loads(f.read_text())
    return out


def _rollout_x(meta: Mapping, label: str) -> float:
    """Optimizer steps per rollout step of run ``label``: x = optimizer step / this is the rollout step."""
    return float(meta.get(label, {}).get("optimizer_steps_per_rollout") or 1)


def _panels(logs: Mapping[str, list[dict]]) -> list[tuple[str, str, str]]:
    """The curves some run logged; accuracy only where it differs from the reward (a 0/1 reward equals it)."""
    def same(log: list[dict]) -> bool:
        pairs = [(r["reward"], r["bupo/accuracy"]) for r in log if "reward" in r and "bupo/accuracy" in r]
        return all(abs(a - b) < 1e-9 for a, b in pairs)

    panels = []
    for key, title, ylabel in CURVES:
        if not any(_series(log, key)[0] for log in logs.values()):
            continue
        if key == "bupo/accuracy" and all(same(log) for log in logs.values()):
            continue
        panels.append((key, title, ylabel))
    return panels


def _shade_internal(ax, logs: Mapping[str, list[dict]], meta: Mapping, label_it: bool) -> None:
    """Shade rollout steps 0..s_inter of the BuPO runs (from bupo_run.json, else from the logged phase)."""
    for label, log in logs.items():
        s_inter = meta.get(label, {}).get("internal_steps")
        if s_inter is None:
            xs, phase = _series(log, "bupo/phase")
            internal = [x for x, p in zip(xs, phase, strict=True) if p > 0.5]
            s_inter = max(internal) / _rollout_x(meta, label) if internal else 0
        if s_inter:
            ax.axvspan(0, s_inter, color="tab:orange", alpha=0.12,
                       label=f"{label}: internal phase (s_inter = {s_inter:g})" if label_it else None)


def training_curves(logs: Mapping[str, list[dict]], path: Path, runs: Mapping[str, Path] | None = None) -> Path | None:
    """One panel per curve (two per row), one line per run, x in rollout steps; BuPO's internal phase shaded."""
    panels = _panels(logs) if logs else []
    if not panels:
        return None
    meta = _run_meta(runs)
    plt = pyplot()
    ncol = min(2, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 3.9 * nrow), squeeze=False)
    for i, (ax, (key, title, ylabel)) in enumerate(zip(axes.flat, panels, strict=False)):
        _shade_internal(ax, logs, meta, label_it=(i == 0))
        for label, log in logs.items():
            xs, ys = _series(log, key)
            if xs:
                per = _rollout_x(meta, label)
                ax.plot([x / per for x in xs], ys, marker=".", label=label)
        if key == "reward" and not any(k == "bupo/accuracy" for k, _, _ in panels):
            title += " (= accuracy: a 0/1 reward)"
        ks = {m.get("internal_layer") for m in meta.values()}
        if key == "bupo/entropy_internal" and len(ks) == 1 and isinstance(k_ := next(iter(ks)), int):
            title += f" (k = {k_}, paper layer {k_ + 1})"
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("rollout step" if meta else "optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.set_visible(False)
    if spare:  # the legend in the empty slot, where it hides no curve
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", fontsize=11, frameon=False)
    else:
        axes.flat[0].legend(fontsize=8)
    return save_figure(fig, path)


def layer_probe_curves(logs: Mapping[str, list[dict]], path: Path, runs: Mapping[str, Path] | None = None) -> Path | None:
    """Mean entropy of every layer policy on the fixed probe batch over training (bupo/layer_entropy/L*)."""
    logs = {label: log for label, log in logs.items()
            if any(k.startswith("bupo/layer_entropy/") for rec in log for k in rec)}
    if not logs:
        return None
    meta = _run_meta(runs)
    plt = pyplot()
    # one y range for every run: GRPO's and BuPO's panels read side by side
    fig, axes = plt.subplots(1, len(logs), figsize=(6.4 * len(logs), 4.0), squeeze=False, sharey=True)
    for ax, (label, log) in zip(axes[0], logs.items(), strict=True):
        _shade_internal(ax, {label: log}, meta, label_it=True)
        per = _rollout_x(meta, label)
        keys = sorted({k for rec in log for k in rec if k.startswith("bupo/layer_entropy/L")},
                      key=lambda k: int(k.rsplit("L", 1)[1]))
        cmap = plt.get_cmap("viridis", max(len(keys), 1))
        for i, key in enumerate(keys):
            xs, ys = _series(log, key)
            ax.plot([x / per for x in xs], ys, color=cmap(i), label=rf"$\pi^{{{int(key.rsplit('L', 1)[1]) + 1}}}$")
        xs, ys = _series(log, "bupo/layer_entropy/final")
        if xs:
            ax.plot([x / per for x in xs], ys, "k--", label=r"$\pi_\theta$")
        ax.set_title(f"{label}: entropy of each layer policy on the probe batch", fontsize=11)
        ax.set_xlabel("rollout step" if meta else "optimizer step")
        ax.set_ylabel("entropy (nats)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def eval_results_of_runs(runs: Mapping[str, Path]) -> list[tuple[str, dict]]:
    """``(label, results.json)`` of each run's last evaluation, preceded by ``base`` (the first run's step-0
    evaluation, if it ran one): the rows of the demo's results table."""
    from bupo.evaluation.report import load_results

    out: list[tuple[str, dict]] = []
    for label, run in runs.items():
        evals = sorted((Path(run) / "evals").glob("step-*/results.json"))
        if not evals:
            continue
        if not out and evals[0].parent.name == "step-000000" and len(evals) > 1:
            out.append(("base", load_results(evals[0])))
        out.append((label, load_results(evals[-1])))
    return out


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
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f5f5f5}
.headline{font-size:1.1em;background:#f4f6fb;border:1px solid #b8c4e0;padding:.6em 1em}"""


def _rel(target: Path, base: Path) -> str:
    """``target`` relative to the report's folder (links keep working when the folder is moved or copied)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(base).resolve())).as_posix()


def _link(target: Path, base: Path, text: str | None = None) -> str:
    rel = _rel(target, base)
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def write_report(path: Path, *, title: str, analysis_dir: Path | None, runs: Mapping[str, Path], table_md: str,
                 settings: Mapping, extra_sections: list[tuple[str, str]] | None = None,
                 summary: Mapping | None = None, results: list[tuple[str, dict]] | None = None,
                 headline: str | None = None) -> Path:
    """Write the report atomically; returns its path.

    ``summary``: the analysis' ``summary.json`` when the caller already holds it (else read from ``analysis_dir``).
    ``results``: ``(label, results.json)`` pairs for the Pass@K curves (default: each run's last evaluation and
    the base model's step-0 one, :func:`eval_results_of_runs`). Links (analysis, runs) are relative to ``path``.
    ``headline``: a sentence shown first, above the results (plain text; its maths rendered by :func:`math_html`).
    """
    from bupo.evaluation.report import pass_at_k_figure

    path = Path(path)
    here = path.parent
    fig_dir = here / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f'<p class="headline">{math_html(headline)}</p>' if headline else "",
             "<p>Conventions: layer k is 0-based as in the official code (paper layer l = k+1); entropies in nats; "
             "projection <code>raw</code> (lm_head of the residual stream, no final norm), as in the paper; "
             "s_inter and the x axes of the training curves count rollout steps.</p>",
             "<h2>Results</h2>", markdown_table_to_html(table_md)]
    if results is None:
        results = eval_results_of_runs(runs)
    passk = pass_at_k_figure(results, fig_dir / "pass_at_k.png") if results else None
    if passk is not None:
        parts.append(img_tag(passk))
    if summary is None and analysis_dir is not None and (Path(analysis_dir) / "summary.json").is_file():
        summary = load_summary(analysis_dir)
    if analysis_dir is not None and summary is not None:
        full = Path(analysis_dir) / "report.html"
        link = f"Full analysis: {_link(full, here)}." if full.is_file() else ""
        parts += ["<h2>Internal entropy flow of the base model</h2>",
                  f"<p>Boundary layer (paper numbering) <b>{summary.get('boundary_layer')}</b> &rarr; suggested "
                  f"internal layer k = <b>{summary.get('suggested_internal_layer')}</b> (0-based). "
                  f"{summary.get('num_samples')} responses, {summary.get('num_tokens')} tokens. {link}</p>"]
        for name in ("entropy_flow", "entropy_change", "layer_entropy", "heatmap"):
            png = Path(analysis_dir) / f"{name}.png"
            if png.is_file():
                parts.append(img_tag(png))
    parts.append("<h2>Training</h2>")
    logs = read_logs(runs)
    for fig in (training_curves(logs, fig_dir / "training_curves.png", runs),
                layer_probe_curves(logs, fig_dir / "layer_probe.png", runs)):
        if fig is not None:
            parts.append(img_tag(fig))
    for heading, body in extra_sections or []:
        parts += [f"<h2>{html.escape(heading)}</h2>", body]
    parts += ["<h2>Settings</h2><table>"]
    parts += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()]
    parts += ["</table>", "<h3>Runs</h3><ul>"]
    for lb, r in runs.items():
        files = [(Path(r) / name, text) for name, text in (("README.md", "model card"),
                                                           ("bupo_run.json", "run summary"),
                                                           ("log_history.json", "log"))]
        extra = ", ".join(_link(f, here, text) for f, text in files if f.is_file())
        parts.append(f"<li>{html.escape(lb)}: {_link(Path(r), here)}" + (f" ({extra})" if extra else "") + "</li>")
    parts += ["</ul></body></html>"]
    return atomic_write_text(path, "\n".join(parts))
