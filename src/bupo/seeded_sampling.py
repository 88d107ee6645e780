"""Seeded sampling for vLLM's CPU backend at the cost of unseeded sampling.

bupo gives every sample its own seed (``SamplingParams(seed=...)``, :func:`bupo.generation.sample_seed`) so a run is
reproducible and a resumed evaluation regenerates exactly the missing samples. vLLM draws a seeded request's token by
the exponential race argmax_v p_v / E_v, E_v ~ Exp(1) i.i.d. (equivalent to sampling from p), and on a CPU
(``TopKTopPSampler.forward_cpu``, vLLM 0.31) it fills the noise for the *whole* batch with ``exponential_()``, then
overwrites every seeded row with ``exponential_(generator=...)``: two passes of torch's scalar exponential sampler
over batch x vocabulary per decode step. On SmolLM2 (49,152 tokens) at 16 rows that is ~30 ms of a ~98 ms decode
step on 2 cores: a third of the engine's time (py-spy; ``benchmarks/bench_engines.py``).

:func:`exponential_race` draws the same race from the per-request generators in one pass of ``uniform_`` (~7x faster
than ``exponential_``): E = -log U with U ~ Uniform(0, 1) (U is clamped to 2^-25 from below, so the 2^-24-likely
U = 0 gives E = 17.3 instead of infinity; E is never 0, so no token wins by a division by zero). The result is the
same distribution, still one independent stream per request (a row's tokens do not depend on which other requests
share its batch), but not vLLM's own stream: for one seed the texts differ from stock vLLM's, as they already differ
between vLLM and transformers.

:func:`install` swaps it into an in-process engine's sampler for batches in which every row is seeded (bupo's
evaluation and analysis); any other batch (TRL's unseeded rollouts, a mixed batch, ``use_fp64_gumbel``) goes to
vLLM's own code. It reaches vLLM's private sampler objects, pinned by ``tests/engines/test_vllm_engines.py``; when
they are not where vLLM 0.31 keeps them, vLLM's sampling stays and one warning says so.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["U_FLOOR", "exponential_race", "install", "topk_topp_sampler"]

U_FLOOR = 2.0**-25  # below the smallest nonzero float32 uniform_ (2^-24): only U = 0 is raised to it


def exponential_race(probs: torch.Tensor, generators: Mapping[int, torch.Generator]) -> torch.Tensor:
    """Token ids [rows]: row i sampled from ``probs[i]`` with its own ``generators[i]`` (every row must have one).

    argmax_v probs[i, v] / E_v with E_v = -log U_v, U_v ~ Uniform(0, 1) from ``generators[i]``; ``probs`` is
    overwritten. A row whose probabilities are all zero returns token 0, as vLLM's own race does."""
    if len(generators) != probs.shape[0] or any(not 0 <= i < probs.shape[0] for i in generators):
        raise ValueError(f"exponential_race needs one generator per row: {probs.shape[0]} rows, generators for "
                         f"{sorted(generators)}")
    noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    for i, generator in generators.items():
        noise[i].uniform_(generator=generator)
    noise.clamp_(min=U_FLOOR).log_().neg_()  # Exp(1), in (0, 17.33]
    return probs.div_(noise.to(probs.dtype)).argmax(dim=-1).view(-1)


def _seeded_forward(sampler: Any, original: Callable[..., Any], logits: torch.Tensor,
                    generators: Mapping[int, torch.Generator], k: torch.Tensor | None,
                    p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``TopKTopPSampler.forward_cpu`` (vLLM 0.31) with the race drawn by :func:`exponential_race` when every row is
    seeded; the rest of vLLM's steps (top-k / top-p masking, processed log-probs) as vLLM does them."""
    if not generators or len(generators) != logits.shape[0] or getattr(sampler, "use_fp64_gumbel", False):
        return original(logits, generators, k, p)
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    logits = apply_top_k_top_p(logits, k, p)
    processed = None
    if sampler.logprobs_mode == "processed_logits":
        processed = logits
    elif sampler.logprobs_mode == "processed_logprobs":
        processed = logits.log_softmax(dim=-1, dtype=torch.float32)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    return exponential_race(probs, generators), processed


def topk_topp_sampler(llm: Any) -> Any:
    """The sampler object of an in-process engine whose ``forward`` :func:`install` replaces (vLLM 0.31)."""
    from bupo.engines import model_runner

    return model_runner(llm).sampler.topk_topp_sampler


def install(llm: Any) -> bool:
    """Route an in-process CPU engine's fully seeded batches through :func:`exponential_race`. True when installed
    (also when it already was); False, with one warning, when vLLM's sampler is not where vLLM 0.31 keeps it."""
    try:
        sampler = topk_topp_sampler(llm)
        original = sampler.forward
        bound_to = getattr(original, "__func__", None)
    except AttributeError:
        sampler = bound_to = None
    if sampler is not None and getattr(original, "bupo_seeded", False):
        return True
    if sampler is None or bound_to is not type(sampler).forward_cpu:
        warnings.warn("bupo: this vLLM's CPU sampler is not where vLLM 0.31 keeps it; seeded requests use vLLM's own "
                      "(slower) sampling", RuntimeWarning, stacklevel=2)
        return False
    forward = functools.partial(_seeded_forward, sampler, original)
    forward.bupo_seeded = True  # type: ignore[attr-defined]
    sampler.forward = forward  # an instance attribute, as vLLM sets it
    return True
