"""Stage 2 of an analysis: one hooked forward per batch of traces -> per-token columns.

:func:`bupo.internal.streams.stream_stats` computes chunked fp32 statistics inside the hooks, so a forward never
holds more than ``chunk_size`` x vocab logits, whatever the number of layers. Position ``t`` of a sequence holds
the distribution that predicts token ``t + 1``: for a ``P``-token prompt and an ``R``-token response the analysed
positions are ``P-1 .. P+R-2`` (every position whose prediction is a response token); with
``positions="official"`` they are one later, ``P .. P+R-1`` (the official script's; see
:data:`bupo.analysis.config.POSITIONS`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bupo.analysis.config import POSITIONS, AnalysisConfig
from bupo.analysis.staging import Shards
from bupo.analysis.summary import CONVENTION_STREAMS, check_convention, entropy_col
from bupo.analysis.traces import Trace


def streams_for(convention: str) -> tuple[str, ...]:
    """Streams to capture: the convention's streams plus resid_pre (only its layer-0 copy is projected)."""
    return ("resid_pre", *CONVENTION_STREAMS[check_convention(convention)])


def _batches(traces: Sequence[Trace], batch_tokens: int) -> Iterator[list[Trace]]:
    batch: list[Trace] = []
    longest = 0
    for tr in traces:
        n = len(tr.prompt_ids) + len(tr.response_ids)
        if batch and max(longest, n) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(tr)
        longest = max(longest, n)
    if batch:
        yield batch


def _padded(batch: Sequence[Trace], pad_id: int, shift: int = 0, end_id: int | None = None):
    """Right-padded ids, attention mask, the analysed positions (``P-1+shift .. P+R-2+shift``) and the realised
    next token of every position of a batch (CPU tensors); ``end_id`` is the token after a response (shift 1)."""
    import torch

    T = max(len(t.prompt_ids) + len(t.response_ids) for t in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.bool)
    for b, tr in enumerate(batch):
        seq = tr.prompt_ids + tr.response_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
        P, R = len(tr.prompt_ids), len(tr.response_ids)
        pos[b, P - 1 + shift : P + R - 1 + shift] = True
    targets = torch.roll(ids, -1, dims=1)  # targets[t] = ids[t+1]
    if shift:  # the last analysed position is the response's last token: what follows it is end_id
        for b, tr in enumerate(batch):
            targets[b, len(tr.prompt_ids) + len(tr.response_ids) - 1] = pad_id if end_id is None else end_id
    return ids, mask, pos, targets


def measure_batch(model, batch: Sequence[Trace], *, convention: str, projector, chunk_size: int | None,
                  pad_id: int, positions: str = "predicting", end_id: int | None = None) -> dict[str, np.ndarray]:
    """Token columns of a batch of traces (right-padded, one hooked forward): one row per analysed position
    (``positions``: :data:`bupo.analysis.config.POSITIONS`), samples in batch order, each sample's rows contiguous."""
    import torch

    from bupo.internal import parts, tap
    from bupo.internal.streams import stream_stats

    device = next(model.parameters()).device
    shift = POSITIONS[positions]
    ids, mask, pos, targets = _padded(batch, pad_id, shift, end_id)
    pos = pos.to(device)
    index = pos.reshape(-1).nonzero().squeeze(1)
    rms: dict[int, torch.Tensor] = {}

    def residual_rms(stream, layer, t):
        # the scale lm_head(h) sees: what makes a raw layer policy near one-hot (projection_health)
        rms[layer] = t.reshape(-1, t.shape[-1]).index_select(0, index).float().pow(2).mean(-1).sqrt()

    L = parts(model).num_layers
    with tap(model, [("resid_post", k) for k in range(L)], residual_rms):
        st = stream_stats(model, ids.to(device), mask.to(device), streams=streams_for(convention),
                          positions=pos, targets=targets.to(device), projection=projector.projection,
                          chunk_size=chunk_size, projector=projector)
    cols: dict[str, np.ndarray] = {entropy_col("resid_pre", 0): st.stats[("resid_pre", 0)].entropy.numpy()}
    for s in CONVENTION_STREAMS[convention]:
        for k in range(L):
            cols[entropy_col(s, k)] = st.stats[(s, k)].entropy.numpy()
    for k in range(L):
        ts = st.stats[("resid_post", k)]
        cols[f"logp.resid_post.{k}"] = ts.logprob.numpy()
        cols[f"top1.resid_post.{k}"] = ts.top1_id.numpy().astype(np.int32)
    for k in range(L):
        cols[f"rms.resid_post.{k}"] = rms[k].cpu().numpy()
    cols["H.final"] = st.final.entropy.numpy()
    cols["logp.final"] = st.final.logprob.numpy()
    cols["top1.final"] = st.final.top1_id.numpy().astype(np.int32)
    P = np.array([len(tr.prompt_ids) for tr in batch])
    R = np.array([len(tr.response_ids) for tr in batch])
    if int(R.sum()) != st.num_positions:
        raise RuntimeError(f"position bookkeeping mismatch: {int(R.sum())} expected, {st.num_positions} measured")
    # response_index of every row: its offset from the start of its sample's run of rows
    response_index = np.arange(int(R.sum())) - np.repeat(np.cumsum(R) - R, R)
    return {
        "sample": np.repeat(np.array([tr.index for tr in batch], dtype=np.int32), R),
        "position": (np.repeat(P - 1 + shift, R) + response_index).astype(np.int32),
        "response_index": response_index.astype(np.int32),
        "token_id": np.array([t for tr in batch for t in tr.response_ids], dtype=np.int32),
        **cols,
    }


def measure(model, tokenizer, todo: Sequence[Trace], cfg: AnalysisConfig, shards: Shards) -> dict[str, Any] | None:
    """One hooked forward per batch of the traces not staged yet; each batch's token columns are staged.

    Returns how the logits were made (``gemm``, ``epilogue``, ``chunk_size``) plus ``seconds``, or None when
    every trace was already staged by a previous (resumed) run.
    """
    import torch
    from tqdm.auto import tqdm

    from bupo.generation import eval_mode
    from bupo.internal.stats import Projector

    done = shards.done()
    pending = [tr for tr in todo if tr.index not in done]
    if not pending:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id
    t0 = time.perf_counter()
    projector = Projector(model, cfg.projection, epilogue=cfg.epilogue)  # one fp32 cast shared by every stream
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc="analyze", unit="sample",
               disable=not cfg.progress)
    with eval_mode(model), torch.inference_mode():
        for batch in _batches(pending, cfg.batch_tokens):
            shards.put(measure_batch(model, batch, convention=cfg.delta, projector=projector,
                                     chunk_size=cfg.chunk_size, pad_id=pad_id, positions=cfg.positions,
                                     end_id=end_id))
            bar.update(len(batch))
    bar.close()
    return {"gemm": projector.gemm, "epilogue": projector.epilogue,
            "chunk_size": cfg.chunk_size or projector.default_chunk, "seconds": time.perf_counter() - t0}


def trace_lens(model, tokenizer, trace: Trace, top: int, positions: str = "predicting") -> dict[str, Any] | None:
    """The logit-lens table (raw and final_norm side by side) at a few analysed positions of one trace."""
    from bupo.analysis.lens import lens_table

    R = len(trace.response_ids)
    # the first analysed position (predicting the first response token by default), one a quarter of the way in,
    # and the last one
    offsets = sorted({0, R // 4, R - 1})
    start = len(trace.prompt_ids) - 1 + POSITIONS[positions]
    ids = trace.prompt_ids + trace.response_ids
    return lens_table(model, tokenizer, ids, positions=[start + o for o in offsets], top=top, sample=trace.index)
