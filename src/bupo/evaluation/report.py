"""Tables in the paper's Table 1 layout (AMC | MATH500 | AIME24 | AIME25 | Avg) and ``eval compare``.

Works on the JSON form of results (``results.json``), so runs can be compared from their folders.
Numbers are percentages with two decimals, as in the paper.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bupo.data.datasets import BENCHMARKS, DISPLAY_NAMES

__all__ = ["PASS_AT_K_FIGURE", "add_pass_at_k_curve", "column_order", "compare_table", "curve_ks", "load_results",
           "pass_at_k_curve", "pass_at_k_figure", "pass_table", "results_table", "settings_line"]

PASS_AT_K_FIGURE = "pass_at_k.png"


def column_order(names: Sequence[str]) -> list[str]:
    """The paper's benchmarks in Table 1 order, then any others in their given order."""
    seen = list(dict.fromkeys(names))
    return [b for b in BENCHMARKS if b in seen] + [b for b in seen if b not in BENCHMARKS]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _avg(results: dict[str, Any], cols: Sequence[str]) -> float | None:
    vals = [results["benchmarks"][c]["avg"] for c in cols if c in results["benchmarks"]]
    return sum(vals) / len(vals) if vals and len(vals) == len(cols) else None


def settings_line(results: dict[str, Any]) -> str:
    s = results["settings"]
    top_k = "off" if s.get("top_k") is None else s["top_k"]
    return (
        f"T={s['temperature']}, top_p={s['top_p']}, top_k={top_k}, max_new_tokens={s['max_new_tokens']}, "
        f"template={s['template']}, reward={s['reward']}, seed={s['seed']}, backend={s['backend']}"
    )


def _header(cols: Sequence[str], first: str = "Model") -> list[str]:
    names = [DISPLAY_NAMES.get(c, c) for c in cols]
    return [
        "| " + " | ".join([first, *names, "Avg"]) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]


def _k_note(runs: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    parts = []
    for c in cols:
        ns = sorted({r["benchmarks"][c]["n"] for r in runs if c in r["benchmarks"]})
        parts.append(f"{DISPLAY_NAMES.get(c, c)} Avg@{'/'.join(str(n) for n in ns)}")
    return ", ".join(parts)


def results_table(results: dict[str, Any], label: str | None = None, figure: str | None = None) -> str:
    """Markdown for one run: the Table 1 row (Avg@K, %), a Pass@K table and, given ``figure`` (a path relative
    to the markdown file), a link to the Pass@K curve."""
    cols = column_order(list(results["benchmarks"]))
    name = label or results.get("label") or "model"
    lines = [
        f"# bupo eval: {name}",
        "",
        f"Avg@K in % ({_k_note([results], cols)}; Avg = mean of the columns). {settings_line(results)}.",
        "",
        *_header(cols),
        "| "
        + " | ".join(
            [name, *(_pct(results["benchmarks"][c]["avg"]) for c in cols), _pct(_avg(results, cols))]
        )
        + " |",
        "",
        pass_table(results),
    ]
    if figure:
        lines += ["", f"![Pass@K curve]({figure})"]
    return "\n".join(lines) + "\n"


def pass_table(results: dict[str, Any]) -> str:
    """Pass@K (%, unbiased estimator) per benchmark, with n, problems and the truncation rate."""
    cols = column_order(list(results["benchmarks"]))
    ks = sorted({int(k) for c in cols for k in results["benchmarks"][c]["pass_at_k"]})
    lines = [
        "Pass@K in % (unbiased estimator over n samples per problem):",
        "",
        "| Benchmark | n | problems | " + " | ".join(f"Pass@{k}" for k in ks) + " | truncated |",
        "|" + "---|" * (len(ks) + 4),
    ]
    for c in cols:
        b = results["benchmarks"][c]
        cells = [_pct(b["pass_at_k"].get(str(k), b["pass_at_k"].get(k))) for k in ks]
        lines.append(
            f"| {DISPLAY_NAMES.get(c, c)} | {b['n']} | {b['problems']} | "
            + " | ".join(cells)
            + f" | {_pct(b['truncated'])} |"
        )
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> dict[str, Any]:
    """``results.json`` of a run folder (or the file itself)."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"no results.json in {p} (is it a `bupo eval --out` folder?)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or "benchmarks" not in data or "settings" not in data:
        raise ValueError(f"{f}: not a bupo eval results file (expected 'benchmarks' and 'settings')")
    return data


def check_comparable(runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """ValueError (one line) when two runs scored one benchmark on different problems: another problem count, or
    other prompts / ground truths (the ``data`` fingerprint, when both results record it). Their Avg@K would not
    measure the same thing, and the table's averages would mix them."""
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, r in runs:
        for name, b in r["benchmarks"].items():
            if name not in first:
                first[name] = (label, b)
                continue
            label0, b0 = first[name]
            if b.get("problems") != b0.get("problems"):
                raise ValueError(f"{name}: {label0!r} was evaluated on {b0.get('problems')} problems, {label!r} on "
                                 f"{b.get('problems')}: Avg@K over different problems does not compare; evaluate "
                                 "both on the same data and --limit")
            if b.get("data") and b0.get("data") and b["data"] != b0["data"]:
                raise ValueError(f"{name}: {label0!r} and {label!r} were evaluated on different problems (prompts or "
                                 "ground truths differ, same count): Avg@K does not compare; evaluate both on the "
                                 "same data file")


def compare_table(runs: Sequence[tuple[str, dict[str, Any]]], figure: str | None = None) -> str:
    """One Table-1-style table across runs (one row per run), then each run's settings and Pass@K; ``figure``
    (a path relative to the markdown file) links the Pass@K curves."""
    if not runs:
        raise ValueError("nothing to compare: give one or more result folders")
    check_comparable(runs)
    cols = column_order([c for _, r in runs for c in r["benchmarks"]])
    lines = [f"Avg@K in % ({_k_note([r for _, r in runs], cols)}; – = not evaluated).", "", *_header(cols)]
    for label, r in runs:
        cells = [_pct(r["benchmarks"][c]["avg"]) if c in r["benchmarks"] else "–" for c in cols]
        lines.append("| " + " | ".join([label, *cells, _pct(_avg(r, cols))]) + " |")
    ks = sorted({int(k) for _, r in runs for b in r["benchmarks"].values() for k in b["pass_at_k"]})
    if ks:
        lines += ["", "Pass@K in %, mean over the benchmarks that report it:", ""]
        lines += ["| Run | " + " | ".join(f"Pass@{k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 1)]
        for label, r in runs:
            cells = []
            for k in ks:
                vals = [b["pass_at_k"][str(k)] for b in r["benchmarks"].values() if str(k) in b["pass_at_k"]]
                cells.append(_pct(sum(vals) / len(vals)) if vals else "–")
            lines.append("| " + " | ".join([label, *cells]) + " |")
    if figure:
        lines += ["", f"![Pass@K curves]({figure})"]
    lines += ["", "Settings:"]
    lines += [f"- {label}: {settings_line(r)}" for label, r in runs]
    return "\n".join(lines) + "\n"


def curve_ks(n: int) -> list[int]:
    """The K of a Pass@K curve from n samples: every power of two up to n, and n itself."""
    ks = [2**i for i in range(max(n, 1).bit_length()) if 2**i <= n]
    return sorted(set(ks) | {n}) if n >= 1 else [1]


def pass_at_k_curve(bench: dict[str, Any]) -> dict[int, float]:
    """``{K: Pass@K}`` of one benchmark's results: at :func:`curve_ks` when its per-problem correct counts are
    recorded (the unbiased estimator from them), else the K it recorded."""
    from bupo.evaluation.metrics import mean_pass_at_k

    counts, n = bench.get("correct_counts"), bench.get("n")
    if counts and isinstance(n, int) and n >= 1:
        return {k: mean_pass_at_k(n, counts, k) for k in curve_ks(n)}
    return {int(k): v for k, v in bench["pass_at_k"].items()}


def pass_at_k_figure(runs: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path | None:
    """Pass@K against K (log scale) per benchmark, one line per run, as the paper's Fig. 6; None if no run has
    Pass@K values. ``runs``: ``(label, results.json dict)`` pairs."""
    from bupo.plotting import pyplot, save_figure

    cols = [c for c in column_order([c for _, r in runs for c in r["benchmarks"]])
            if any(r["benchmarks"].get(c, {}).get("pass_at_k") for _, r in runs)]
    if not cols:
        return None
    plt = pyplot()
    ncol = min(len(cols), 4)
    nrow = -(-len(cols) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(6.0, 4.4 * ncol), 3.8 * nrow), squeeze=False)
    for ax, c in zip(axes.flat, cols, strict=False):
        ns, all_ks = set(), set()
        for label, r in runs:
            b = r["benchmarks"].get(c)
            if not b or not b.get("pass_at_k"):
                continue
            vals = pass_at_k_curve(b)
            ks = sorted(vals)
            ax.plot(ks, [100 * vals[k] for k in ks], marker="o", label=label)
            ns.add(b["n"])
            all_ks.update(ks)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        ax.minorticks_off()
        ax.set_xlabel("K (samples per problem)")
        ax.set_ylabel("Pass@K (%)")
        ax.set_title(f"{DISPLAY_NAMES.get(c, c)} (n = {'/'.join(str(n) for n in sorted(ns))})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    fig.suptitle("Pass@K (unbiased estimator; as the paper's Fig. 6)", fontsize=10)
    return save_figure(fig, Path(path))


def add_pass_at_k_curve(out_dir: str | Path, results: dict[str, Any], label: str | None = None) -> Path | None:
    """``bupo eval``'s folder: write ``pass_at_k.png`` and rewrite ``table.md`` with a link to it."""
    from bupo.io import atomic_write_text

    out = Path(out_dir)
    name = label or results.get("label") or "model"
    fig = pass_at_k_figure([(name, results)], out / PASS_AT_K_FIGURE)
    if fig is not None:
        atomic_write_text(out / "table.md", results_table(results, label, figure=PASS_AT_K_FIGURE))
    return fig
