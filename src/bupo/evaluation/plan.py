"""What an evaluation samples and what the sample log already holds.

- :func:`plan_benchmarks`: per benchmark, the validated rows, the samples per problem ``n`` and the Pass@K values.
- :func:`generation_settings` / :func:`settings_hash`: the identity of the samples (model, template, sampling
  settings, seed, backend); its hash ``gen`` keys every stored sample.
- :func:`plan_samples`: for every (benchmark, problem, sample), reuse the stored record when it was generated
  with the same settings from the same prompt (re-scoring it when the reward or ground truth changed), else
  a generation request with the sample's own seed ``sample_seed(seed, prompt_key, j)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bupo.data.datasets import default_samples, validate_rows
from bupo.data.templates import render_prompt
from bupo.evaluation.metrics import default_ks
from bupo.evaluation.samples import SampleKey
from bupo.generation import sample_seed

__all__ = ["FALLBACK_SAMPLES", "Plan", "SampleWork", "benchmark_key", "generation_settings", "plan_benchmarks",
           "plan_samples", "settings_hash"]

FALLBACK_SAMPLES = 16  # samples per problem for benchmarks the paper sets none for
# a stored record without these is incomplete (an older format): it is generated again
_REQUIRED_FIELDS = {"response", "correct", "finish_reason", "num_tokens", "ground_truth"}

Plan = dict[str, tuple[list[dict], int, list[int]]]  # name -> (rows, samples per problem, Pass@K values)


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
) -> Plan:
    """name -> (validated rows, samples per problem, Pass@K values); ValueError for bad rows, n < 1 or K > n."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty mapping of benchmark name -> rows")
    plan: Plan = {}
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


def generation_settings(*, model_id: str, template: str, temperature: float, top_p: float, top_k: int | None,
                        max_new_tokens: int, seed: int, backend: str) -> dict[str, Any]:
    """The settings that determine a sample (with its prompt): a change in any of them means new samples."""
    return {
        "model": model_id,
        "template": template,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "backend": backend,
    }


def settings_hash(gen_settings: Mapping[str, Any]) -> str:
    """The ``gen`` hash stored with every sample (16 hex digits of the SHA-256 of the sorted JSON)."""
    return _sha(json.dumps(gen_settings, sort_keys=True))


def benchmark_key(name: str, problem: int) -> str:
    """The prompt key of a problem's per-sample seeds: ``"{benchmark}/{problem}"``."""
    return f"{name}/{problem}"


@dataclass
class SampleWork:
    """The samples of a run: ``records`` (benchmark, problem, sample) -> scored record (reused ones now, generated
    ones as they come), ``reused`` per benchmark, ``rescore`` (reused records to score again), and the generation
    ``requests`` (prompt, seed) with the record skeletons ``pending`` they complete (aligned)."""

    records: dict[tuple[str, int, int], dict] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    rescore: list[dict] = field(default_factory=list)
    requests: list[tuple[str, int]] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)


def _reusable(old: dict | None, prompt_sha: str) -> bool:
    return old is not None and old.get("prompt_sha") == prompt_sha and old.keys() >= _REQUIRED_FIELDS


def plan_samples(
    plan: Plan,
    tokenizer: Any,
    template: str,
    *,
    seed: int,
    gen_hash: str,
    reward: str,
    stored: Mapping[SampleKey, dict],
    prompt_key: Callable[[str, int], int | str] = benchmark_key,
) -> SampleWork:
    """Split the planned samples into those ``stored`` already holds (same ``gen_hash`` and prompt) and the
    requests still to generate; a reused record of another reward or ground truth is queued for re-scoring.
    Sample ``j`` of problem ``i`` of benchmark ``b`` is seeded ``sample_seed(seed, prompt_key(b, i), j)``."""
    work = SampleWork()
    for name, (rows, nb, _) in plan.items():
        work.reused[name] = 0
        for i, row in enumerate(rows):
            prompt = render_prompt(tokenizer, row["prompt"], template)
            psha = _sha(prompt)
            gt = row["reward_model"]["ground_truth"]
            for j in range(nb):
                old = stored.get((name, i, j, gen_hash))
                if _reusable(old, psha):
                    rec = dict(old)  # type: ignore[arg-type]
                    work.records[(name, i, j)] = rec
                    work.reused[name] += 1
                    if rec.get("reward") != reward or rec.get("ground_truth") != gt:
                        rec["ground_truth"] = gt
                        work.rescore.append(rec)
                    continue
                row_seed = sample_seed(seed, prompt_key(name, i), j)
                work.requests.append((prompt, row_seed))
                work.pending.append(
                    {"benchmark": name, "problem": i, "sample": j, "gen": gen_hash, "prompt_sha": psha,
                     "seed": row_seed, "ground_truth": gt}
                )  # fmt: skip
    return work
