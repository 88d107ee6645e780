"""Aggregation: scored samples -> Avg@K / Pass@K per benchmark (:class:`BenchmarkResult`) and a run's
:class:`EvalResults` (the ``results.json`` / ``table.md`` content and the trainer's logged scalars)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bupo import __version__
from bupo.data.datasets import DISPLAY_NAMES
from bupo.evaluation.metrics import avg_at_k, mean_pass_at_k
from bupo.evaluation.report import results_table
from bupo.io import atomic_write_text

__all__ = ["RESULTS_FILE", "TABLE_FILE", "BenchmarkResult", "EvalResults", "aggregate", "benchmark_result"]

RESULTS_FILE, TABLE_FILE = "results.json", "table.md"


@dataclass
class BenchmarkResult:
    """One benchmark: ``avg`` = Avg@n, ``pass_at_k[k]`` = Pass@k (fractions in [0, 1])."""

    name: str
    n: int
    problems: int
    avg: float
    pass_at_k: dict[int, float]
    correct_counts: list[int]
    truncated: float  # fraction of responses cut at max_new_tokens
    mean_response_tokens: float
    reused: int = 0  # samples taken from an earlier run's samples.jsonl
    data: str | None = None  # fingerprint of the problems (prompts + ground truths): runs compare only on equal ones

    @property
    def display(self) -> str:
        return DISPLAY_NAMES.get(self.name, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "display": self.display,
            "n": self.n,
            "problems": self.problems,
            "avg": self.avg,
            "avg_metric": f"Avg@{self.n}",
            "pass_at_k": {str(k): v for k, v in sorted(self.pass_at_k.items())},
            "correct_counts": self.correct_counts,
            "truncated": self.truncated,
            "mean_response_tokens": self.mean_response_tokens,
            "reused": self.reused,
            "data": self.data,
        }


@dataclass
class EvalResults:
    benchmarks: dict[str, BenchmarkResult]
    settings: dict[str, Any]
    label: str = "model"
    reward_stats: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def average(self) -> float:
        """Mean Avg@K over the benchmarks (the table's "Avg" column)."""
        return sum(b.avg for b in self.benchmarks.values()) / len(self.benchmarks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bupo_version": __version__,
            "label": self.label,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": self.settings,
            "benchmarks": {name: b.to_dict() for name, b in self.benchmarks.items()},
            "average": self.average,
            "reward_stats": self.reward_stats,
            "seconds": self.seconds,
            "conventions": "values are fractions in [0, 1]; tables print percentages. Avg@K = mean over "
            "problems of the accuracy of their K samples; Pass@K = unbiased 1 - C(n-c,K)/C(n,K).",
        }

    def table(self) -> str:
        """The markdown of ``table.md``."""
        return results_table(self.to_dict(), self.label)

    def save(self, folder: Path) -> None:
        """Write ``results.json`` and ``table.md`` to ``folder`` (each atomically)."""
        atomic_write_text(folder / RESULTS_FILE, json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(folder / TABLE_FILE, self.table())

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat scalars for a trainer's logger: ``{prefix}/{benchmark}/avg@{n}``, ``.../pass@{k}``, ``{prefix}/avg``."""
        out: dict[str, float] = {}
        for name, b in self.benchmarks.items():
            out[f"{prefix}/{name}/avg@{b.n}"] = b.avg
            for k, v in b.pass_at_k.items():
                out[f"{prefix}/{name}/pass@{k}"] = v
            out[f"{prefix}/{name}/truncated"] = b.truncated
        out[f"{prefix}/avg"] = self.average
        return out


def data_fingerprint(rows: Sequence[dict]) -> str:
    """The identity of a benchmark's problems: their prompts and ground truths, in order."""
    from bupo.provenance import fingerprint

    return fingerprint([[r.get("prompt"), (r.get("reward_model") or {}).get("ground_truth")] for r in rows])


def benchmark_result(name: str, grid: Sequence[Sequence[dict]], n: int, ks: Sequence[int],
                     reused: int = 0, data: str | None = None) -> BenchmarkResult:
    """Avg@n and Pass@k (k in ``ks``) of one benchmark from its scored records, ``grid[i][j]`` = sample ``j`` of
    problem ``i`` (``n`` samples each); a sample counts as correct when its ``correct`` verdict is 1."""
    verdicts = [[r["correct"] for r in row] for row in grid]
    counts = [int(sum(v >= 1.0 for v in row)) for row in verdicts]
    flat = [r for row in grid for r in row]
    return BenchmarkResult(
        name=name,
        n=n,
        problems=len(grid),
        avg=avg_at_k(verdicts),
        pass_at_k={k: mean_pass_at_k(n, counts, k) for k in ks},
        correct_counts=counts,
        truncated=sum(r["finish_reason"] == "length" for r in flat) / len(flat),
        mean_response_tokens=sum(r["num_tokens"] for r in flat) / len(flat),
        reused=reused,
        data=data,
    )


def aggregate(plan: Mapping[str, tuple[list[dict], int, list[int]]], records: Mapping[tuple[str, int, int], dict],
              reused: Mapping[str, int]) -> dict[str, BenchmarkResult]:
    """One :class:`BenchmarkResult` per planned benchmark (``plan``: name -> (rows, n, ks)) from ``records``
    keyed (benchmark, problem, sample)."""
    return {
        name: benchmark_result(name, [[records[(name, i, j)] for j in range(nb)] for i in range(len(rows))], nb, kb,
                               reused.get(name, 0), data_fingerprint(rows))
        for name, (rows, nb, kb) in plan.items()
    }
