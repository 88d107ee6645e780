"""Evaluation: Avg@K and Pass@K on the paper's benchmarks (``bupo eval``), callable in-process.

Public API (imported lazily so that ``bupo --help`` stays fast):

- ``evaluate(model, tokenizer, datasets, *, n, ks, temperature, top_p, top_k, max_new_tokens, template,
  reward, seed, batch_size, out_dir, backend, model_id, label, progress) -> EvalResults``
- ``EvalResults`` (``.benchmarks[name].avg`` / ``.pass_at_k[k]``, ``.average``, ``.table()``,
  ``.metrics(prefix)``, ``.to_dict()``), ``BenchmarkResult``
- ``pass_at_k(n, c, k)``, ``mean_pass_at_k(n, counts, k)``, ``avg_at_k(verdicts)``, ``default_ks(n)``
- backends: ``HFBackend``, ``VLLMBackend``, ``SamplingSettings``, ``vllm_sampling_kwargs``
- reports: ``compare_table``, ``load_results``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "core",
    "EvalResults": "core",
    "BenchmarkResult": "core",
    "resolve_template": "core",
    "pass_at_k": "metrics",
    "mean_pass_at_k": "metrics",
    "avg_at_k": "metrics",
    "default_ks": "metrics",
    "PAPER_KS": "metrics",
    "HFBackend": "backends",
    "VLLMBackend": "backends",
    "SamplingSettings": "backends",
    "vllm_sampling_kwargs": "backends",
    "compare_table": "report",
    "load_results": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bupo.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bupo.evaluation.{module}"), name)
