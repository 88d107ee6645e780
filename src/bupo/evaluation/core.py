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

The stages: plan and reuse (:mod:`bupo.evaluation.plan`, reading :mod:`bupo.evaluation.samples`), generate and
score (:func:`generate_and_score`, here), aggregate (:mod:`bupo.evaluation.results`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bupo.data.templates import resolve_template
from bupo.evaluation.backends import HFBackend, SamplingSettings, model_fingerprint
from bupo.evaluation.plan import (
    FALLBACK_SAMPLES,
    SampleWork,
    generation_settings,
    plan_benchmarks,
    plan_samples,
    settings_hash,
)
from bupo.evaluation.results import BenchmarkResult, EvalResults, aggregate
from bupo.evaluation.samples import SAMPLES_FILE, SampleLog
from bupo.generation import Completion
from bupo.io import guard_output
from bupo.rewards import DEFAULT_TIMEOUT, REWARDS, RewardStats, extract_boxed, score_batch

__all__ = [
    "FALLBACK_SAMPLES",
    "BenchmarkResult",
    "EvalResults",
    "evaluate",
    "generate_and_score",
    "make_scorer",
    "plan_benchmarks",
    "resolve_template",
]

Scorer = Callable[[list[dict]], None]


def make_scorer(reward: str, *, timeout: float = DEFAULT_TIMEOUT, stats: RewardStats | None = None) -> Scorer:
    """A function that scores records in place with ``reward``: sets ``reward`` and ``correct`` (1.0 or 0.0);
    calls, errors and timeouts are counted in ``stats``."""

    def score(recs: list[dict]) -> None:
        verdicts = score_batch(
            reward,
            [r["response"] for r in recs],
            [r["ground_truth"] for r in recs],
            timeout=timeout,
            stats=stats,
        )
        for r, v in zip(recs, verdicts, strict=True):
            r["reward"], r["correct"] = reward, float(v)

    return score


def completed_record(skeleton: dict, completion: Completion) -> dict:
    """A planned sample's record with its response (not yet scored)."""
    rec = dict(skeleton)
    rec.update(
        response=completion.text,
        extracted=extract_boxed(completion.text),
        finish_reason=completion.finish_reason,
        num_tokens=len(completion.token_ids),
    )
    return rec


def generate_and_score(
    backend: Any, settings: SamplingSettings, work: SampleWork, score: Scorer, log: SampleLog | None = None
) -> None:
    """Re-score ``work.rescore``, then generate ``work.requests``: each finished batch is scored, stored in
    ``work.records`` and appended to ``log`` before the next batch starts."""
    log = log or SampleLog(None)
    if work.rescore:
        score(work.rescore)
        log.append(work.rescore)

    def on_batch(indices: list[int], completions: list[Completion]) -> None:
        recs = [completed_record(work.pending[i], c) for i, c in zip(indices, completions, strict=True)]
        score(recs)
        for rec in recs:
            work.records[(rec["benchmark"], rec["problem"], rec["sample"])] = rec
        log.append(recs)

    if work.requests:
        backend.generate(work.requests, settings, on_batch)


def _backend(model: Any, tokenizer: Any, backend: Any, *, batch_size: int, progress: bool,
             model_id: str | None, policy_layer: int | None = None, projection: str = "raw") -> Any:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if backend == "hf":
        return HFBackend(model, tokenizer, batch_size=batch_size, progress=progress, policy_layer=policy_layer,
                         projection=projection)
    if policy_layer is not None:
        raise ValueError("policy_layer samples from pi^k through transformers' generate: it needs backend 'hf'")
    if isinstance(backend, str):
        raise ValueError(f"unknown backend {backend!r}; accepted: hf, or a backend object (VLLMBackend)")
    if model_id is None:
        raise ValueError("model_id is required with a custom backend (it keys resumed samples)")
    return backend


def _policy_settings(model: Any, policy_layer: int | None, projection: str) -> dict[str, Any]:
    """What ``results.json`` records about the sampled policy: the model's own, or pi^k under ``projection``."""
    if policy_layer is None:
        return {"layer": None, "paper_layer": None, "projection": None, "policy": "pi (the model's own)"}
    from bupo.internal import parts
    from bupo.internal.adapters import check_projection
    from bupo.internal.policy import check_layer

    check_projection(projection)
    check_layer(policy_layer, parts(model).num_layers)
    return {"layer": policy_layer, "paper_layer": policy_layer + 1, "projection": projection,
            "policy": f"pi^k, k = {policy_layer} (0-based; paper layer {policy_layer + 1}), {projection}"}


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
    policy_layer: int | None = None,
    projection: str = "raw",
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
        policy_layer, projection: sample from the internal policy pi^k (0-based k, paper layer k+1) under
            ``raw`` (lm_head(H^k), the paper's) or ``final_norm`` instead of the model's own policy (hf backend
            only); recorded in ``settings["policy"]`` and part of the resume key.
    """
    t0 = time.monotonic()
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; accepted: {', '.join(REWARDS)}")
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    backend_obj = _backend(model, tokenizer, backend, batch_size=batch_size, progress=progress, model_id=model_id,
                           policy_layer=policy_layer, projection=projection)
    template = resolve_template(tokenizer, template)
    plan = plan_benchmarks(datasets, n, ks)
    if model_id is None:
        # the fingerprint only keys resumed samples; skip it (a pass over every parameter) without out_dir
        model_id = model_fingerprint(model) if out_dir is not None else "not-saved"
    gen_settings = generation_settings(
        model_id=model_id, template=template, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, seed=seed, backend=getattr(backend_obj, "name", type(backend_obj).__name__),
    )  # fmt: skip
    policy = _policy_settings(model, policy_layer, projection)
    if policy_layer is not None:  # pi^k's samples are keyed apart from pi's (pi's key is unchanged)
        gen_settings["policy"] = policy
    gen_hash = settings_hash(gen_settings)

    out_path = Path(out_dir) if out_dir is not None else None
    # one writer per folder (its sample log and results); `bupo eval` holds it already (the lock is re-entrant)
    with guard_output(out_path, command="bupo eval") if out_path is not None else contextlib.nullcontext():
        log = SampleLog(out_path / SAMPLES_FILE if out_path else None)
        stored, bad_lines = log.read()
        work = plan_samples(plan, tokenizer, template, seed=seed, gen_hash=gen_hash, reward=reward, stored=stored)
        stats = RewardStats()
        with log:
            generate_and_score(backend_obj, sampling, work, make_scorer(reward, timeout=reward_timeout, stats=stats),
                               log)
        settings = {**gen_settings, "policy": policy, "reward": reward, "gen_hash": gen_hash}
        results = _results(plan, work, settings, bad_lines, label, stats, time.monotonic() - t0)
        if out_path is not None:
            results.save(out_path)
    return results


def _results(plan: Mapping[str, tuple[list[dict], int, list[int]]], work: SampleWork, settings: dict[str, Any],
             bad_lines: int, label: str, stats: RewardStats, seconds: float) -> EvalResults:
    """The aggregated results of a finished evaluation; settings gain each benchmark's n and K values and the count
    of unreadable sample-log lines skipped."""
    settings = {**settings, "n": {name: p[1] for name, p in plan.items()},
                "ks": {name: p[2] for name, p in plan.items()}, "skipped_unreadable_sample_lines": bad_lines}
    return EvalResults(benchmarks=aggregate(plan, work.records, work.reused), settings=settings, label=label,
                       reward_stats=stats.as_dict(), seconds=seconds)
