"""``evaluate``: Avg@K / Pass@K of a model on math benchmarks, resumable, in-process or from ``bupo eval``.

Per benchmark, every problem gets ``n`` samples (paper defaults: AIME 32, AMC/MATH500 16, others
16); sample ``j`` of problem ``i`` of benchmark ``b`` is drawn with seed
``sample_seed(seed, f"{b}/{i}", j)`` (bupo.generation), so it is the same whatever else runs with it.
Each response is scored by the chosen reward (``boxed_exact``, the paper's, or ``math_verify``).

Files written to ``out_dir`` (when given):

- ``samples.jsonl``: one line per response (benchmark, problem, sample, response, extracted answer,
  ground truth, verdict, finish reason, token count, and the hash ``gen`` of the generation settings),
  appended after every generation batch with flush + fsync. A rerun with the same settings (model
  weights, template, T, top_p, top_k, max_new_tokens, seed, backend) and the same prompt reuses every
  line it finds, so an interrupted run loses at most the batch in flight; a larger ``n`` only adds
  the new samples. A rerun with another reward re-scores the stored responses (appending the new
  verdicts; the last line for a sample wins). Lines of other settings stay in the file, ignored.
- ``results.json`` and ``table.md`` (the paper's Table 1 layout), written atomically.

The trainer calls :func:`evaluate` directly (``out_dir=None`` to keep nothing on disk); the paper
validates every 30 steps with n=1 at T=1.0.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bupo import __version__
from bupo.data.datasets import DISPLAY_NAMES, default_samples, validate_rows
from bupo.data.templates import render_prompt, resolve_template
from bupo.evaluation.backends import HFBackend, SamplingSettings, model_fingerprint
from bupo.evaluation.metrics import avg_at_k, default_ks, mean_pass_at_k
from bupo.evaluation.report import results_table
from bupo.generation import Completion, sample_seed
from bupo.io import atomic_write_text
from bupo.rewards import REWARDS, RewardStats, extract_boxed, score_batch

__all__ = [
    "FALLBACK_SAMPLES",
    "BenchmarkResult",
    "EvalResults",
    "evaluate",
    "plan_benchmarks",
    "resolve_template",
]

FALLBACK_SAMPLES = 16  # samples per problem for benchmarks the paper sets none for
SAMPLES_FILE, RESULTS_FILE, TABLE_FILE = "samples.jsonl", "results.json", "table.md"
_REQUIRED_FIELDS = {"response", "correct", "finish_reason", "num_tokens", "ground_truth"}


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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _samples_per_benchmark(name: str, n: int | Mapping[str, int] | None) -> int:
    if isinstance(n, Mapping):
        value = n.get(name)
        if value is None:
            value = default_samples(name) or FALLBACK_SAMPLES
    elif n is None:
        value = default_samples(name) or FALLBACK_SAMPLES
    else:
        value = n
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: samples per problem n must be an integer >= 1, got {value!r}")
    return value


def plan_benchmarks(
    datasets: Mapping[str, list[dict]], n: int | Mapping[str, int] | None, ks: Sequence[int] | None
) -> dict[str, tuple[list[dict], int, list[int]]]:
    """name -> (validated rows, samples per problem, Pass@K values); ValueError for bad rows, n < 1 or K > n."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty mapping of benchmark name -> rows")
    plan: dict[str, tuple[list[dict], int, list[int]]] = {}
    for name, rows in datasets.items():
        rows = validate_rows(list(rows), f"benchmark {name!r}")
        nb = _samples_per_benchmark(name, n)
        kb = default_ks(nb) if ks is None else sorted(set(ks))
        for k in kb:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"Pass@K values must be integers >= 1, got {k!r}")
            if k > nb:
                raise ValueError(
                    f"{name}: Pass@{k} needs at least {k} samples per problem but n={nb}; raise --n or lower --k"
                )
        plan[name] = (rows, nb, kb)
    return plan


def _load_samples(path: Path) -> tuple[dict[tuple[str, int, int, str], dict], int]:
    """Existing sample records keyed by (benchmark, problem, sample, gen hash); the last line wins.
    Unreadable lines (a write cut by an interruption) are skipped and counted."""
    records: dict[tuple[str, int, int, str], dict] = {}
    bad = 0
    if not path.exists():
        return records, bad
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                r = json.loads(line)
                records[(r["benchmark"], int(r["problem"]), int(r["sample"]), r["gen"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
    return records, bad


class _SampleLog:
    """Append-only samples.jsonl; every append is flushed and fsynced."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a line cut by an earlier interruption must not swallow the next record
            needs_newline = False
            if path.exists() and path.stat().st_size > 0:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held across batches)
            if needs_newline:
                self._f.write("\n")

    def append(self, records: Sequence[dict]) -> None:
        if self._f is None or not records:
            return
        # ASCII-escaped JSON: any text (lone surrogates included) round-trips
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def evaluate(
    model: Any,
    tokenizer: Any,
    datasets: Mapping[str, list[dict]],
    *,
    n: int | Mapping[str, int] | None = None,
    ks: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    max_new_tokens: int,
    template: str = "auto",
    reward: str = "boxed_exact",
    seed: int = 0,
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    backend: Any = "hf",
    model_id: str | None = None,
    label: str = "model",
    progress: bool = False,
    reward_timeout: float = 5.0,
) -> EvalResults:
    """Avg@n and Pass@k of ``model`` on each benchmark in ``datasets`` (name -> rows).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer (``backend="hf"``); for another backend
            object (e.g. :class:`~bupo.evaluation.backends.VLLMBackend`), ``model`` is ignored and
            ``model_id`` is required.
        datasets: benchmark name -> rows (``prompt`` messages + ``reward_model.ground_truth``).
        n: samples per problem: one int for all, a mapping per benchmark, or None for the paper's
            defaults (AIME 32, AMC/MATH500 16, others 16).
        ks: Pass@K values (each <= n, else ValueError); default: 1, 4, 16, 64, 256 up to n.
        temperature, top_p, top_k, max_new_tokens: sampling settings (paper: T=1.0, top_p=1.0).
        template: ``auto`` or one of ``bupo.data.templates.TEMPLATES``.
        reward: ``boxed_exact`` (the paper's) or ``math_verify``.
        seed: base seed of the per-sample seeds.
        batch_size: sequences per generation batch.
        out_dir: where to write samples.jsonl / results.json / table.md and resume from; None = nothing written.
        backend: ``"hf"`` or a backend object with ``generate(requests, settings, on_batch)``.
        model_id: identity of the model for resuming; default: a fingerprint of the HF model's weights
            (only computed when ``out_dir`` is given).
        label: the row name in tables.
    """
    t0 = time.monotonic()
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; accepted: {', '.join(REWARDS)}")
    settings_obj = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if backend == "hf":
        backend_obj: Any = HFBackend(model, tokenizer, batch_size=batch_size, progress=progress)
    elif isinstance(backend, str):
        raise ValueError(f"unknown backend {backend!r}; accepted: hf, or a backend object (VLLMBackend)")
    else:
        backend_obj = backend
        if model_id is None:
            raise ValueError("model_id is required with a custom backend (it keys resumed samples)")
    template = resolve_template(tokenizer, template)

    plan = plan_benchmarks(datasets, n, ks)

    if model_id is None:
        # the fingerprint only keys resumed samples; skip it (a pass over every parameter) without out_dir
        model_id = model_fingerprint(model) if out_dir is not None else "not-saved"
    gen_settings = {
        "model": model_id,
        "template": template,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "backend": getattr(backend_obj, "name", type(backend_obj).__name__),
    }
    gen_hash = _sha(json.dumps(gen_settings, sort_keys=True))

    out_path = Path(out_dir) if out_dir is not None else None
    existing, bad_lines = _load_samples(out_path / SAMPLES_FILE) if out_path else ({}, 0)
    log = _SampleLog(out_path / SAMPLES_FILE if out_path else None)
    stats = RewardStats()

    def score_records(recs: list[dict]) -> None:
        verdicts = score_batch(
            reward,
            [r["response"] for r in recs],
            [r["ground_truth"] for r in recs],
            timeout=reward_timeout,
            stats=stats,
        )
        for r, v in zip(recs, verdicts, strict=True):
            r["reward"], r["correct"] = reward, float(v)

    # gather reusable samples and the requests still to generate
    records: dict[tuple[str, int, int], dict] = {}
    requests: list[tuple[str, int]] = []
    pending: list[dict] = []  # record skeletons, aligned with requests
    rescore: list[dict] = []
    reused: dict[str, int] = {}
    for name, (rows, nb, _) in plan.items():
        reused[name] = 0
        for i, row in enumerate(rows):
            prompt = render_prompt(tokenizer, row["prompt"], template)
            psha = _sha(prompt)
            gt = row["reward_model"]["ground_truth"]
            for j in range(nb):
                old = existing.get((name, i, j, gen_hash))
                if old is not None and old.get("prompt_sha") == psha and old.keys() >= _REQUIRED_FIELDS:
                    rec = dict(old)
                    records[(name, i, j)] = rec
                    reused[name] += 1
                    if rec.get("reward") != reward or rec.get("ground_truth") != gt:
                        rec["ground_truth"] = gt
                        rescore.append(rec)
                    continue
                row_seed = sample_seed(seed, f"{name}/{i}", j)
                requests.append((prompt, row_seed))
                pending.append(
                    {"benchmark": name, "problem": i, "sample": j, "gen": gen_hash, "prompt_sha": psha,
                     "seed": row_seed, "ground_truth": gt}
                )  # fmt: skip

    try:
        if rescore:
            score_records(rescore)
            log.append(rescore)

        def on_batch(indices: list[int], completions: list[Completion]) -> None:
            recs = []
            for idx, c in zip(indices, completions, strict=True):
                rec = dict(pending[idx])
                rec.update(
                    response=c.text,
                    extracted=extract_boxed(c.text),
                    finish_reason=c.finish_reason,
                    num_tokens=len(c.token_ids),
                )
                recs.append(rec)
            score_records(recs)
            for rec in recs:
                records[(rec["benchmark"], rec["problem"], rec["sample"])] = rec
            log.append(recs)

        if requests:
            backend_obj.generate(requests, settings_obj, on_batch)
    finally:
        log.close()

    benchmarks: dict[str, BenchmarkResult] = {}
    for name, (rows, nb, kb) in plan.items():
        grid = [[records[(name, i, j)] for j in range(nb)] for i in range(len(rows))]
        verdicts = [[r["correct"] for r in row] for row in grid]
        counts = [int(sum(v >= 1.0 for v in row)) for row in verdicts]
        flat = [r for row in grid for r in row]
        benchmarks[name] = BenchmarkResult(
            name=name,
            n=nb,
            problems=len(rows),
            avg=avg_at_k(verdicts),
            pass_at_k={k: mean_pass_at_k(nb, counts, k) for k in kb},
            correct_counts=counts,
            truncated=sum(r["finish_reason"] == "length" for r in flat) / len(flat),
            mean_response_tokens=sum(r["num_tokens"] for r in flat) / len(flat),
            reused=reused[name],
        )
    settings = {
        **gen_settings,
        "reward": reward,
        "gen_hash": gen_hash,
        "n": {name: p[1] for name, p in plan.items()},
        "ks": {name: p[2] for name, p in plan.items()},
        "skipped_unreadable_sample_lines": bad_lines,
    }
    results = EvalResults(
        benchmarks=benchmarks,
        settings=settings,
        label=label,
        reward_stats=stats.as_dict(),
        seconds=time.monotonic() - t0,
    )
    if out_path is not None:
        atomic_write_text(out_path / RESULTS_FILE, json.dumps(results.to_dict(), indent=2) + "\n")
        atomic_write_text(out_path / TABLE_FILE, results.table())
    return results
