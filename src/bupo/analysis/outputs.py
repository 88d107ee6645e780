"""Stages 3 and 4 of an analysis: the staged token columns -> per-layer statistics and ``summary.json``'s
content; then the output folder (tokens.parquet, traces.jsonl, figures, report.html, summary.json), assembled in
the run's partial folder and published whole, ``summary.json`` last (:meth:`bupo.io.Staging.publish`)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bupo.analysis.config import POSITION_CONVENTIONS, PRESET_DIFFERENCES, PRESETS, AnalysisConfig
from bupo.analysis.figures import FIGURES
from bupo.analysis.result import (
    REPORT_FILE,
    SUMMARY_FILE,
    TOKENS_FILE,
    TRACES_FILE,
    AnalysisResult,
    layer_matrix,
)
from bupo.analysis.staging import Shards
from bupo.analysis.summary import Aggregator, boundary_details, boundary_record, projection_health
from bupo.analysis.traces import SKIP_REASONS, Inputs, Trace
from bupo.io import Staging, atomic_path, atomic_write_json, atomic_write_text

#: every file an analysis may publish: a new analysis replaces all of them (one it does not write is removed)
OUTPUT_FILES = (SUMMARY_FILE, TOKENS_FILE, TRACES_FILE, REPORT_FILE, *(f"{name}.png" for name in FIGURES))


def metadata(model, model_path: str | None, inputs: Inputs, cfg: AnalysisConfig) -> dict[str, Any]:
    """The summary's description of the model, the inputs and the settings (what a resumed run must share)."""
    from bupo.internal.adapters import parts

    p = parts(model)
    return {
        "model": model_path or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "projection": cfg.projection,
        "delta_convention": cfg.delta,
        "template": cfg.template,
        "data": inputs.data_desc,
        "traces": inputs.traces_desc,
        "generation": None if inputs.rows is None else {
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "seed": cfg.seed, "n": 1, "generator": "bupo.engines.generate", "backend": cfg.backend},
        "max_samples": cfg.max_samples,
        "preset": None if cfg.preset is None else {"name": cfg.preset, "settings": PRESETS[cfg.preset],
                                                    "not_reproduced": PRESET_DIFFERENCES[cfg.preset]},
        "positions": cfg.positions,
        "position_convention": POSITION_CONVENTIONS[cfg.positions],
        "layer_indexing": "lists: element i = paper layer i+1 = 0-based layer k=i; boundary_layer is 1-based",
        "units": "nats",
        "num_layers": p.num_layers,
        "vocab_size": int(p.lm_head.weight.shape[0]),
        "tied_embeddings": bool(p.tied),
        "softcap": p.softcap,
        "final_norm_weight": norm_weight_stats(p.final_norm),
    }


def norm_weight_stats(norm) -> dict[str, float] | None:
    """Scale of the final norm's gain: the factor raw logits miss (raw = lm_head(h), lens = lm_head(g * h / rms(h)))."""
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    if type(norm).__name__.startswith("Gemma"):  # Gemma RMSNorm multiplies by (1 + weight)
        w = 1.0 + w
    return {"rms": float(w.pow(2).mean().sqrt()), "mean": float(w.mean()), "max_abs": float(w.abs().max())}


@dataclass
class Aggregate:
    stats: dict[str, Any]
    num_samples: int
    num_tokens: int
    heat: np.ndarray | None
    frames: list[dict[str, np.ndarray]]


def aggregate(shards: Shards, num_layers: int, cfg: AnalysisConfig, heatmap_index: int,
              tokens_path: Path | None, keep: bool) -> Aggregate:
    """One pass over the staged blocks: per-layer statistics, the heatmap row, tokens.parquet (one row group per
    batch: memory per batch, not per run) and/or the in-memory table."""
    agg = Aggregator(num_layers, cfg.delta)
    heat = None
    frames = []
    with _parquet_rows(tokens_path) as write_tokens:
        for block in shards.blocks():
            for s in _per_sample(block):
                agg.add_sample(s)
                if int(s["sample"][0]) == heatmap_index:
                    heat = layer_matrix(s, num_layers)
            stored = _stored(block, cfg.token_dtype)
            write_tokens(stored)
            if keep:
                frames.append(stored)
    return Aggregate(agg.result(), agg.num_samples, agg.num_tokens, heat, frames)


def _per_sample(block: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Split a block into its samples: contiguous slices (each sample's rows are adjacent, in sample order)."""
    s = block["sample"]
    if np.any(s[1:] < s[:-1]):
        raise RuntimeError("staged token rows are not in sample order")
    _, starts = np.unique(s, return_index=True)
    for a, b in zip(starts, [*starts[1:], len(s)], strict=True):
        yield {c: v[a:b] for c, v in block.items()}


def _stored(block: Mapping[str, np.ndarray], token_dtype: str) -> dict[str, np.ndarray]:
    """Columns as stored in tokens.parquet: entropies and log-probs in ``token_dtype``, ids as they are."""
    return {c: (v.astype(token_dtype, copy=False) if c.startswith(("H.", "logp.")) else v) for c, v in block.items()}


@contextlib.contextmanager
def _parquet_rows(path: Path | None) -> Iterator[Callable[[Mapping[str, np.ndarray]], None]]:
    """Yields ``write(columns)``, which appends one row group to ``path``; the file appears atomically when the
    block exits cleanly. Without a path ``write`` does nothing (an in-memory analysis)."""
    if path is None:
        yield lambda cols: None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    with atomic_path(path) as tmp:

        def write(cols: Mapping[str, np.ndarray]) -> None:
            nonlocal writer
            table = pa.Table.from_pydict(dict(cols))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)

        try:
            yield write
        finally:
            if writer is not None:
                writer.close()  # before atomic_path moves (or removes) the file


def build_summary(meta: Mapping[str, Any], agg: Aggregate, *, num_inputs: int, skip_reason: Mapping[int, str],
                  cfg: AnalysisConfig, engine: Mapping[str, Any] | None, heatmap_index: int,
                  lens: Mapping[str, Any] | None) -> dict[str, Any]:
    """summary.json's content: metadata, per-layer statistics, projection health, boundary."""
    from bupo.provenance import versions

    skipped = Counter(skip_reason.values())
    stats = agg.stats
    health = projection_health(stats, projection=cfg.projection, final_norm_weight=meta.get("final_norm_weight"))
    bd = boundary_details(stats["ffn_entropy_change"], tol=cfg.boundary_tol)
    return {
        **meta,
        "num_samples": agg.num_samples,
        "num_tokens": agg.num_tokens,
        "num_inputs": num_inputs,
        "skipped": {r: int(skipped.get(r, 0)) for r in SKIP_REASONS},
        **stats,
        "projection_health": health,
        **boundary_record(bd, health, delta=cfg.delta, projection=cfg.projection,
                           ffn_delta_means=stats["ffn_entropy_change"]),
        "heatmap_sample": heatmap_index,
        "lens": lens,
        "chunk_size": engine["chunk_size"] if engine else cfg.chunk_size,
        # how the logits were made and reduced in this call (None: every sample came from a resumed run)
        "gemm": engine["gemm"] if engine else None,
        "epilogue": engine["epilogue"] if engine else None,
        "token_dtype": cfg.token_dtype,
        "measure_seconds": round(engine["seconds"], 3) if engine else 0.0,
        **{f"{name}_version": v for name, v in versions().items()},  # bupo, torch, transformers
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_outputs(result: AnalysisResult, staging: Staging, *, all_traces: Sequence[Trace],
                  trace_records: Sequence[Mapping], skip_reason: Mapping[int, str], heat: np.ndarray | None,
                  figures: bool) -> None:
    """traces.jsonl, figures, report.html and summary.json next to tokens.parquet in ``staging.output``, then
    published into ``result.out_dir`` as a whole, summary.json last (its presence marks a finished analysis)."""
    out = staging.output
    summary = result.summary
    atomic_write_text(out / TRACES_FILE, "".join(
        json.dumps({"index": i, **rec, "prompt_tokens": len(all_traces[i].prompt_ids),
                    "response_tokens": len(all_traces[i].response_ids), "skipped": skip_reason.get(i)},
                   ensure_ascii=False, default=str) + "\n"
        for i, rec in enumerate(trace_records)))
    figure_paths = {}
    if figures:
        from bupo.analysis.figures import make_figures
        from bupo.analysis.report import write_report

        figure_paths = make_figures(summary, out, heatmap=heat, heatmap_sample=summary["heatmap_sample"])
        write_report(summary, figure_paths, out / REPORT_FILE)
    atomic_write_json(out / SUMMARY_FILE, summary, indent=1, ensure_ascii=False, allow_nan=False)
    staging.publish(last=SUMMARY_FILE, replaces=OUTPUT_FILES)
    result.figures = {name: result.out_dir / p.name for name, p in figure_paths.items()}
