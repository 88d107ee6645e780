"""One-read entropy epilogue for CUDA, in Triton (optional: used only where Triton imports and the logits are on GPU).

Each program reduces one row of fp32 logits ``z`` [n, V] in a single pass, keeping per-lane online accumulators
(lane j sees columns j, j + BLOCK, j + 2·BLOCK, ...):

    m = max z,   s = sum exp(z - m),   t = sum exp(z - m) (z - m)        (updated online when m grows:
    s <- a s + e,   t <- a (t + s (m_old - m)) + e (z - m),   a = exp(m_old - m))

then merges the lanes the same way and returns H = log s - t / s, logsumexp = m + log s, argmax (first
occurrence, as torch.argmax) and top-1 probability 1 / s — the quantities of
:func:`bupo.internal.stats.entropy_epilogue`, with the same cancellation-free form. The compiled torch epilogue
reads each logits chunk twice (max, then sums); this reads it once, which is what an epilogue that sits behind a
memory-bound [n, V] fp32 buffer is worth on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
# launch shape: lanes per program and warps (one row per program). benchmarks/gpu_check.py on an H100, fp32 logits
# [8192, 151936]: 1024/4 read 2.74 TB/s (1.82 ms), 2048/8 2.65, 4096/16 2.56, 4096/8 2.09; compiled torch 1.31
BLOCK = 1024
NUM_WARPS = 4


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def entropy_rows(z_ptr, stride, V, ent_ptr, lse_ptr, arg_ptr, p1_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        m = tl.full([BLOCK], neg_inf, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=neg_inf).to(tl.float32)
            valid = x > neg_inf
            m_new = tl.maximum(m, x)
            seen = m > neg_inf
            a = tl.where(seen, tl.exp(m - m_new), 0.0)
            dm = tl.where(seen, m - m_new, 0.0)
            xs = tl.where(valid, x - m_new, 0.0)
            e = tl.where(valid, tl.exp(xs), 0.0)
            t = a * (t + s * dm) + e * xs
            s = a * s + e
            idx = tl.where(x > m, cols, idx)  # strict: the first column that reached this lane's max
            m = m_new
        mx = tl.max(m, axis=0)
        seen = m > neg_inf
        a = tl.where(seen, tl.exp(m - mx), 0.0)
        dm = tl.where(seen, m - mx, 0.0)
        S = tl.sum(a * s, axis=0)
        T = tl.sum(a * (t + s * dm), axis=0)
        arg = tl.min(tl.where(m == mx, idx, V), axis=0)
        log_s = tl.log(S)
        tl.store(ent_ptr + row, tl.maximum(log_s - T / S, 0.0))
        tl.store(lse_ptr + row, mx + log_s)
        tl.store(arg_ptr + row, arg.to(tl.int64))
        tl.store(p1_ptr + row, 1.0 / S)

    return entropy_rows


def entropy_epilogue_triton(z: torch.Tensor, block: int | None = None, num_warps: int | None = None):
    """(entropy, logsumexp, argmax, top-1 probability) per row of fp32 logits ``z`` [n, V], in one read of ``z``."""
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed")
    if z.dim() != 2 or z.dtype != torch.float32 or z.stride(1) != 1:
        raise ValueError("expected row-contiguous fp32 logits [n, V]")
    n, V = z.shape
    ent = torch.empty(n, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(ent)
    p1 = torch.empty_like(ent)
    arg = torch.empty(n, device=z.device, dtype=torch.int64)
    if n:
        _kernel()[(n,)](z, z.stride(0), V, ent, lse, arg, p1, BLOCK=block or BLOCK, num_warps=num_warps or NUM_WARPS)
    return ent, lse, arg, p1
