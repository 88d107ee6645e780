"""Streaming per-token statistics of a policy read off hidden states, in token chunks.

For hidden states ``h`` [N, d] and a projection (``raw``: z = lm_head(h); ``final_norm``: z = lm_head(final_norm(h));
both followed by the model's own softcap and divided by ``temperature``) this computes, per row:

    entropy   H = -sum_j p_j log p_j  (nats)
    logprob   log softmax(z)[target]                             (if targets are given)
    top1_id   argmax_j z_j,   top1_prob = softmax(z)[top1_id]

How: with m = max_j z_j, e_j = exp(z_j - m), s = sum_j e_j and t = sum_j e_j (z_j - m) <= 0,

    H = log s - t / s,   logsumexp z = m + log s,   top1_prob = 1 / s.

Both terms of H are >= 0, so nothing cancels even when raw residual-stream logits are in the hundreds (the
textbook ``lse - sum p z`` loses ~1e-3 nats there).

Rows are processed ``chunk_size`` at a time with **fp32 logits**: at most one chunk x vocab of logits (plus one
chunk x vocab of exponentials in the eager epilogue; none with the compiled one) ever exists, independent of N
and of how many layers/streams a caller projects. The GEMM that makes the logits:

- fp32 weights: fp32 GEMM;
- bf16/fp16 weights on CUDA: the model's own low-precision operands with fp32 accumulation and fp32 output
  (``torch.mm(..., out_dtype=torch.float32)``), as exact as casting both operands to fp32, at tensor-core speed
  and without an fp32 copy of the unembedding;
- bf16/fp16 weights elsewhere: an fp32 copy of the unembedding, made once per :class:`Projector`.

On a sharded model (FSDP2 DTensor shards, ZeRO-3 partitions) lm_head's weight is full only inside a gather: the
operand is gathered once per :meth:`Projector.stats` / :meth:`Projector.logits` call
(:func:`bupo.internal.sharding.full_parameters`; collective, so every rank must call alike) and dropped after it.

The epilogue (max, exp, two sums) has three implementations with the same maths, equal to ~1e-5 nats:
``eager`` torch ops (~8 passes over each chunk), ``compiled`` (``torch.compile``: two passes; ~9x faster than
eager on CPU) and ``triton`` (:mod:`bupo.internal.triton_entropy`, CUDA: one pass). ``auto`` picks triton on
CUDA, compiled for vocabularies of 16k+, eager for small vocabularies, where a compile costs more than it saves.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bupo.internal import triton_entropy
from bupo.internal.adapters import ModelParts, apply_head_postprocessing, check_projection, parts
from bupo.internal.sharding import full_parameters, full_shape, is_sharded

EPILOGUES = ("auto", "eager", "compiled", "triton")
AUTO_COMPILE_VOCAB = 16384


@dataclass
class TokenStats:
    """Per-token statistics; 1-D tensors of equal length N (one row per analysed position), on the device of the
    hidden states they were read from (:func:`bupo.internal.streams.stream_stats` returns them on the CPU)."""

    entropy: torch.Tensor
    logprob: torch.Tensor | None
    top1_id: torch.Tensor
    top1_prob: torch.Tensor

    def cpu(self) -> TokenStats:
        return TokenStats(self.entropy.cpu(), None if self.logprob is None else self.logprob.cpu(),
                          self.top1_id.cpu(), self.top1_prob.cpu())


def entropy_epilogue(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, logsumexp, argmax, top-1 probability) of each row of fp32 logits ``z`` [n, V] (see module doc).

    Written so that ``torch.compile`` fuses it into two passes over ``z`` and never materialises exp(z).
    """
    m, arg = z.max(dim=-1)
    # clamp: exp(-104) already underflows to 0, so this changes nothing for finite logits, but a masked (-inf)
    # entry then adds 0 * -1e4 = 0 to t instead of 0 * -inf = nan
    zs = (z - m.unsqueeze(-1)).clamp_min(-1e4)
    e = zs.exp()
    s = e.sum(dim=-1)
    t = (e * zs).sum(dim=-1)
    log_s = s.log()
    return (log_s - t / s).clamp_min(0.0), m + log_s, arg, s.reciprocal()


def _entropy_epilogue_eager(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same maths as :func:`entropy_epilogue`, in place on ``z`` (one extra chunk x vocab buffer, for exp)."""
    m, arg = z.max(dim=-1)
    zs = z.sub_(m.unsqueeze(-1)).clamp_min_(-1e4)  # see entropy_epilogue
    e = zs.exp()
    s = e.sum(dim=-1)
    t = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).reshape(-1)  # sum_j e_j zs_j without a third buffer
    del e
    log_s = s.log()
    return (log_s - t / s).clamp_min_(0.0), m + log_s, arg, s.reciprocal()


@functools.cache
def _compiled_epilogue():
    # dynamic rows: the last chunk of every trace has its own length; one graph serves them all
    return torch.compile(entropy_epilogue, dynamic=True)


def auto_chunk_rows(weight: torch.Tensor, vocab_size: int | None = None) -> int:
    """Rows per logits chunk when the caller gives none: 1024 on CPU; on CUDA the largest power of two up to 8192
    whose fp32 chunk takes at most a quarter of the free GPU memory (big chunks keep the GEMM near its peak:
    8192 rows ran at 61% of the GEMM floor on an H100 where 2048 ran at 58%)."""
    if not weight.is_cuda:
        return 1024
    free, _ = torch.cuda.mem_get_info(weight.device)
    rows = 8192
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    while rows > 256 and rows * vocab * 4 > free // 4:
        rows //= 2
    return rows


def _mm_out_fp32_works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class Projector:
    """Projects hidden states onto the vocabulary the way one projection mode defines it.

    Holds what every stream of an analysis shares (the unembedding operand, fp32 when it has to be cast, and the
    epilogue), so many streams pay for one cast. ``epilogue``: ``eager``, ``compiled`` (``torch.compile``),
    ``triton`` (one-read kernel, CUDA only) or ``auto``: triton on CUDA when Triton imports, else compiled on CUDA
    or for vocabularies of 16k+, else eager. An explicit choice that cannot run raises; ``auto`` falls back to
    eager with a warning. ``gemm`` and ``epilogue`` say what was chosen.
    """

    def __init__(self, model: torch.nn.Module, projection: str = "raw", *, epilogue: str = "auto"):
        if epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {epilogue!r}; accepted: {', '.join(EPILOGUES)}")
        self.parts: ModelParts = parts(model)
        self.projection = check_projection(projection)
        w = self.parts.lm_head.weight  # dtype, device and shape only: its values are read in held()
        self.vocab_size = int(full_shape(w)[0])
        low = w.dtype in (torch.bfloat16, torch.float16)
        self._mm_fp32_out = low and w.is_cuda and _mm_out_fp32_works(w.device, w.dtype)
        if self._mm_fp32_out:
            self.gemm = f"{str(w.dtype).removeprefix('torch.')} operands, fp32 accumulate/output"
        else:
            self.gemm = "fp32"
        # FSDP2 / ZeRO-3: the weights are full only inside a gather, so the operand is made per call, never kept
        self._sharded = is_sharded(self.parts.model)
        self._held: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if not self._sharded:
            self._held = self._make_operand()
        if epilogue == "auto":
            # a compile costs seconds once per process: worth it on a GPU, or when the vocabulary is large enough
            # that the eager epilogue's ~8 passes over each chunk cost as much as the GEMM itself
            if w.is_cuda and triton_entropy.AVAILABLE:
                epilogue = "triton"
            elif w.is_cuda or self.vocab_size >= AUTO_COMPILE_VOCAB:
                epilogue = "compiled"
            else:
                epilogue = "eager"
            self._strict = False
        else:
            self._strict = True
        if epilogue == "triton" and not (w.is_cuda and triton_entropy.AVAILABLE):
            raise ValueError("epilogue='triton' needs Triton and the model on a CUDA device; "
                             "accepted elsewhere: eager, compiled, auto")
        self.epilogue = epilogue
        self.default_chunk = auto_chunk_rows(w, self.vocab_size)

    def _make_operand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(unembedding as the GEMM takes it, fp32 bias) from lm_head's full weight (see the module doc)."""
        w = self.parts.lm_head.weight.detach()
        b = self.parts.lm_head.bias
        return (w if self._mm_fp32_out else w.float()), (None if b is None else b.detach().float())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the unembedding (and, for ``final_norm``, the final norm's full gain) for the block.

        A plain model's operand is made once, in the constructor. A sharded one's (FSDP2 shards, ZeRO-3
        partitions) is gathered here, on entry, through :func:`bupo.internal.sharding.full_parameters` and
        dropped on exit: one gather per :meth:`stats` call, however many chunks it has. Re-entrant.
        """
        if self._held is not None:
            yield
            return
        norm = self.parts.final_norm if self.projection == "final_norm" else None
        with full_parameters(self.parts.model, self.parts.lm_head, norm):
            self._held = self._make_operand()
            try:
                yield
            finally:
                self._held = None

    def logits(self, h: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """Logits for rows ``h``; ``normed=True`` means ``h`` already went through the final norm."""
        with self.held():
            return self._logits(h, normed)

    def _logits(self, h: torch.Tensor, normed: bool) -> torch.Tensor:
        weight, bias = self._held
        if self.projection == "final_norm" and not normed:
            # .forward, not __call__: stream_stats hooks the final norm to read the real policy, and a projection
            # made from inside another hook must not re-enter that hook (its gain is full: see held)
            h = self.parts.final_norm.forward(h)
        if self._mm_fp32_out:
            z = torch.mm(h.reshape(-1, h.shape[-1]).to(weight.dtype), weight.t(),
                         out_dtype=torch.float32).reshape(*h.shape[:-1], -1)
            if bias is not None:
                z.add_(bias)
        else:
            z = F.linear(h.to(weight.dtype), weight, bias)
        return apply_head_postprocessing(z, self.parts.softcap)

    def _epilogue(self, z: torch.Tensor):
        if self.epilogue != "eager":
            try:
                if self.epilogue == "triton":
                    return triton_entropy.entropy_epilogue_triton(z.contiguous())
                return _compiled_epilogue()(z)
            except Exception as exc:  # noqa: BLE001 - no compiler / unsupported backend: eager gives the same numbers
                if self._strict:
                    raise RuntimeError(f"the {self.epilogue} entropy epilogue failed: {exc}") from exc
                warnings.warn(f"the {self.epilogue} entropy epilogue failed ({type(exc).__name__}: {exc}); "
                              "using the eager epilogue", RuntimeWarning, stacklevel=3)
                self.epilogue = "eager"
        return _entropy_epilogue_eager(z)

    @torch.no_grad()
    def stats(
        self,
        hidden: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        chunk_size: int | None = None,
        temperature: float = 1.0,
        normed: bool = False,
    ) -> TokenStats:
        """Statistics of each row of ``hidden`` [..., d], ``chunk_size`` rows at a time (None: ``default_chunk``)."""
        chunk_size = chunk_size or self.default_chunk
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        hidden = hidden.reshape(-1, hidden.shape[-1])
        n = hidden.shape[0]
        if targets is not None:
            targets = targets.reshape(-1)
            if targets.shape[0] != n:
                raise ValueError(f"targets has {targets.shape[0]} rows, hidden has {n}")
        ent, lps, ids, top = [], [], [], []
        # results stay on the device: a .cpu() here would stall the GPU (stream_stats copies once per forward)
        with self.held():
            for start in range(0, n, chunk_size):
                z = self._logits(hidden[start : start + chunk_size], normed).float()
                if temperature != 1.0:
                    z.div_(temperature)
                if targets is not None:  # before the epilogue: the eager one shifts z in place
                    t = targets[start : start + chunk_size].to(z.device)
                    z_t = z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
                h, lse, arg, p1 = self._epilogue(z)
                del z
                ent.append(h)
                ids.append(arg)
                top.append(p1)
                if targets is not None:
                    lps.append(z_t - lse)
        def cat(xs, dtype=torch.float32):
            return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype, device=hidden.device)

        return TokenStats(
            entropy=cat(ent),
            logprob=cat(lps) if targets is not None else None,
            top1_id=cat(ids, torch.long),
            top1_prob=cat(top),
        )


def token_stats(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    *,
    projection: str = "raw",
    targets: torch.Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    epilogue: str = "auto",
) -> TokenStats:
    """Entropy (nats), target log-prob, top-1 id/prob of the policy read off ``hidden`` [..., d] (see module doc)."""
    return Projector(model, projection, epilogue=epilogue).stats(hidden, targets=targets, chunk_size=chunk_size,
                                                               temperature=temperature)
