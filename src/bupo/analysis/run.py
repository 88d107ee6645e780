"""``bupo analyze`` as a Python API: internal-policy entropy flow over reasoning traces.

Pipeline, one module a stage: rows (paper parquet / JSONL / the bundled task) or precomputed traces ->
:mod:`~bupo.analysis.traces` (seeded generation with the chat template, tokenisation, selection) ->
:mod:`~bupo.analysis.measure` (one hooked forward per batch, chunked fp32 statistics inside the hooks: never more
than ``chunk_size`` x vocab logits, whatever the number of layers) -> :mod:`~bupo.analysis.staging` (per-batch
shards, resumable) -> :mod:`~bupo.analysis.outputs` (per-layer summaries, boundary layer, figures, report).
Settings: :class:`~bupo.analysis.config.AnalysisConfig`; the result: :mod:`~bupo.analysis.result`.

Conventions (all recorded in ``summary.json``):

- **Positions.** Position ``t`` of a sequence holds the distribution that predicts token ``t + 1``. For a
  prompt of ``P`` tokens and a response of ``R`` tokens we analyse the ``R`` positions ``P-1 .. P+R-2``,
  i.e. every position whose prediction is a response token, and record the log-prob of that realised token.
  (The official script starts one position later and includes the position after the last response token:
  ``positions="official"``, which ``--preset official`` selects.)
- **Layers** 0-based ``k`` in token columns, paper layer ``l = k + 1``; summary lists have element ``i`` = layer
  ``i + 1``. ``boundary_layer`` is 1-based, ``suggested_internal_layer = boundary_layer - 1`` is 0-based.
- **Projection** ``raw`` = lm_head(h) (paper, default) or ``final_norm`` = lm_head(final_norm(h)); both with the
  model's softcap. ``final_entropy`` is always the model's real policy lm_head(final_norm(h_L)).
- **ΔH convention** ``bupo`` (paper / official script) or ``residual``; see :mod:`bupo.analysis.summary`.
- Entropies in nats.

The output folder is assembled in a partial folder and published whole, ``summary.json`` last, so a directory
without it is an unfinished run, which the next call with the same settings resumes from its staged shards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bupo.analysis.config import AnalysisConfig
from bupo.analysis.measure import measure, trace_lens
from bupo.analysis.outputs import aggregate, build_summary, metadata, write_outputs
from bupo.analysis.outputs import norm_weight_stats as _norm_weight_stats  # noqa: F401 (bupo.analysis.health)
from bupo.analysis.result import SUMMARY_FILE, TOKENS_FILE, AnalysisResult
from bupo.analysis.result import suggested_layer as suggested_layer  # bupo.training.run imports it from here
from bupo.analysis.staging import STAGING_DIR, Shards
from bupo.analysis.traces import Inputs, collect_traces, read_inputs, select_traces
from bupo.io import Staging, guard_output
from bupo.models.load import load_model, resolve_device  # the one loader, re-exported here

__all__ = ["AnalysisConfig", "AnalysisResult", "analyze", "load_model", "resolve_device"]


# ---------------------------------------------------------------------------------------------------------------
# the API


def analyze(
    model: Any,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | Sequence[Mapping] | None = None,
    traces: str | os.PathLike | Sequence[Mapping] | None = None,
    out_dir: str | os.PathLike | None = None,
    config: AnalysisConfig | None = None,
    trust_remote_code: bool = False,
    **settings: Any,
) -> AnalysisResult:
    """Analyse the internal-policy entropy of ``model`` over response tokens (see the module docstring).

    Args:
        model: a local checkpoint folder, or a loaded HF causal LM (then ``tokenizer`` is required).
        data: rows (paper parquet / JSONL path, or a list of row dicts with a ``prompt`` message list); one
            response per row is generated (seeded, ``template`` applied). Mutually exclusive with ``traces``.
        traces: precomputed ``{"prompt": str | messages, "response": str}`` (JSONL path or list). String prompts
            are taken verbatim; message lists get ``template``.
        out_dir: where to write summary.json, tokens.parquet, traces.jsonl, figures and report.html; None keeps
            everything in memory (no files).
        config: an :class:`AnalysisConfig`; or its fields as keyword arguments (``projection="final_norm"``,
            ``max_new_tokens=256``, ...), which override the config's. See :class:`AnalysisConfig` for each one.
        trust_remote_code: a model path's own Python code may run (only ``--trust-remote-code`` sets it;
            :func:`bupo.models.load.load_model`).

    The model runs in eval mode; a loaded model's training flags are restored when analyze returns or raises.

    Returns an :class:`AnalysisResult`. Raises ValueError for bad input; samples that cannot be analysed
    (empty prompt or response, longer than the context) are skipped and counted in ``summary["skipped"]``.
    """
    names = {f.name for f in dataclasses.fields(AnalysisConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"analyze() got unexpected keyword arguments {unknown}; settings: {', '.join(sorted(names))}")
    cfg = dataclasses.replace(config or AnalysisConfig(), **settings)
    out = None if out_dir is None else Path(out_dir)
    cfg.validate(out_dir=out)
    if out is None:
        return _load_and_run(model, tokenizer, data, traces, None, cfg, trust_remote_code)
    # one writer per folder; a finished analysis is replaced only with overwrite (as a whole, at the publish)
    with guard_output(out, command="bupo analyze", inputs=[model if isinstance(model, str | os.PathLike) else None],
                      finished=[SUMMARY_FILE], overwrite=cfg.overwrite, what="a finished analysis",
                      hint="pass overwrite=True (--overwrite) or choose another --out"):
        return _load_and_run(model, tokenizer, data, traces, out, cfg, trust_remote_code)


def _load_and_run(model: Any, tokenizer: Any, data: Any, traces: Any, out: Path | None,
                  cfg: AnalysisConfig, trust_remote_code: bool = False) -> AnalysisResult:
    model_path = None
    if isinstance(model, str | os.PathLike):
        model_path = str(model)
        model, tokenizer = load_model(model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (analyze(model, tokenizer, ...))")
    from bupo.data.templates import resolve_template

    # auto -> the template bupo train / bupo eval use for this tokenizer; the summary records the resolved one
    from bupo.engines import resolve_backend

    cfg = dataclasses.replace(cfg, template=resolve_template(tokenizer, cfg.template),
                              backend=resolve_backend(cfg.backend))
    return _run(model, tokenizer, model_path, read_inputs(data, traces, cfg.max_samples), out, cfg)


def _run(model: Any, tokenizer: Any, model_path: str | None, inputs: Inputs, out: Path | None,
         cfg: AnalysisConfig) -> AnalysisResult:
    """The stages in order: traces -> measure (staged, resumable) -> aggregate -> summary -> publish."""
    from bupo.internal.adapters import parts

    p = parts(model)
    meta = metadata(model, model_path, inputs, cfg)
    staging = None if out is None else Staging(out, name=STAGING_DIR, fingerprint=_fingerprint(model, meta, inputs),
                                                resume=cfg.resume)
    ctx = getattr(p.text_config, "max_position_embeddings", None)
    all_traces, trace_records = collect_traces(model, tokenizer, inputs, cfg, staging, ctx)
    todo, skip_reason = select_traces(all_traces, ctx, trace_records if inputs.rows is not None else None)
    hs = cfg.heatmap_sample
    if hs is not None and hs not in {tr.index for tr in todo}:
        why = skip_reason.get(hs, f"out of range: inputs are 0..{len(all_traces) - 1}")
        raise ValueError(f"heatmap_sample {hs} is not analysed ({why}); pick an analysed sample")
    hm_index = hs if hs is not None else todo[0].index

    shards = Shards(staging)
    engine = measure(model, tokenizer, todo, cfg, shards)
    lens = None
    if out is not None:  # the report's logit-lens table: one short forward of one trace
        lens = trace_lens(model, tokenizer, next(tr for tr in todo if tr.index == hm_index), cfg.lens_top, cfg.positions)
    keep = bool(cfg.keep_tokens or (cfg.keep_tokens is None and out is None))
    agg = aggregate(shards, p.num_layers, cfg, hm_index, None if staging is None else staging.output / TOKENS_FILE,
                    keep)
    summary = build_summary(meta, agg, num_inputs=len(all_traces), skip_reason=skip_reason, cfg=cfg, engine=engine,
                            heatmap_index=hm_index, lens=lens)
    result = AnalysisResult(summary=summary, out_dir=out)
    if keep:
        import pandas as pd

        result._tokens = pd.concat([pd.DataFrame(f) for f in agg.frames], ignore_index=True)
    if staging is not None:
        write_outputs(result, staging, all_traces=all_traces, trace_records=trace_records, skip_reason=skip_reason,
                      heat=agg.heat, figures=cfg.figures)
    return result


def _fingerprint(model: Any, meta: Mapping[str, Any], inputs: Inputs) -> str:
    """What staged work must share to be resumed: the model (weights too), the settings that change the numbers
    and the inputs' content (not their path), so a resumed run never mixes shards of different traces."""
    from bupo.provenance import fingerprint, model_fingerprint

    keys = ("model", "model_type", "dtype", "projection", "delta_convention", "template", "generation",
            "max_samples", "num_layers", "positions")
    return fingerprint({**{k: meta[k] for k in keys}, "weights": model_fingerprint(model),
                        "inputs": fingerprint({"rows": inputs.rows, "traces": inputs.trace_rows})})
