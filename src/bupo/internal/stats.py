"""Streaming per-token statistics of a policy read off hidden states, in token chunks.

For hidden states ``h`` [N, d] and a projection (``raw``: z = lm_head(h); ``final_norm``: z = lm_head(final_norm(h));
both followed by the model's own softcap and divided by ``temperature``) this computes, per row:

    entropy   H = -sum_j p_j log p_j,  log p = z - logsumexp(z)  (nats)
    logprob   log softmax(z)[target]                             (if targets are given)
    top1_id   argmax_j z_j,   top1_prob = softmax(z)[top1_id]

Rows are processed ``chunk_size`` at a time with fp32 logits (the lm_head weight is cast to fp32 once per call,
so bf16 models get fp32 accumulation): at most one chunk x vocab of logits, plus one chunk x vocab of
probabilities, ever exists — independent of N and of how many layers/streams a caller projects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bupo.internal.adapters import ModelParts, apply_head_postprocessing, check_projection, parts


@dataclass
class TokenStats:
    """Per-token statistics; 1-D CPU tensors of equal length N (one row per analysed position)."""

    entropy: torch.Tensor
    logprob: torch.Tensor | None
    top1_id: torch.Tensor
    top1_prob: torch.Tensor

    def __len__(self) -> int:
        return int(self.entropy.shape[0])

    @staticmethod
    def cat(items: list[TokenStats]) -> TokenStats:
        has_lp = all(s.logprob is not None for s in items)
        return TokenStats(
            entropy=torch.cat([s.entropy for s in items]),
            logprob=torch.cat([s.logprob for s in items]) if has_lp else None,
            top1_id=torch.cat([s.top1_id for s in items]),
            top1_prob=torch.cat([s.top1_prob for s in items]),
        )


class Projector:
    """Projects hidden states onto the vocabulary the way one projection mode defines it.

    Holds the fp32 copy of the unembedding for the duration of an analysis, so many streams share one cast.
    """

    def __init__(self, model: torch.nn.Module, projection: str = "raw", *, fp32: bool = True):
        self.parts: ModelParts = parts(model)
        self.projection = check_projection(projection)
        w = self.parts.lm_head.weight.detach()
        b = self.parts.lm_head.bias
        self.weight = w.float() if fp32 else w
        self.bias = None if b is None else (b.detach().float() if fp32 else b.detach())

    def logits(self, h: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """Logits for rows ``h``; ``normed=True`` means ``h`` already went through the final norm."""
        if self.projection == "final_norm" and not normed:
            # .forward, not __call__: stream_stats hooks the final norm to read the real policy, and a projection
            # made from inside another hook must not re-enter that hook
            h = self.parts.final_norm.forward(h)
        z = F.linear(h.to(self.weight.dtype), self.weight, self.bias)
        return apply_head_postprocessing(z, self.parts.softcap)

    @torch.no_grad()
    def stats(
        self,
        hidden: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        chunk_size: int = 1024,
        temperature: float = 1.0,
        normed: bool = False,
    ) -> TokenStats:
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
        for start in range(0, n, chunk_size):
            z = self.logits(hidden[start : start + chunk_size], normed=normed).float()
            if temperature != 1.0:
                z.div_(temperature)
            # log-probs in place (lp = z - logsumexp z); H = -sum_j p_j lp_j. Summing p*lp, not lse - sum p*z,
            # avoids cancellation between two large numbers when logits are large (raw residual streams).
            lp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))
            lp_max, arg = lp.max(dim=-1)
            p = lp.exp()
            # sum_j p_j lp_j as a batched dot product: no third chunk x vocab buffer
            ent.append(torch.bmm(p.unsqueeze(1), lp.unsqueeze(2)).reshape(-1).neg_().clamp_min_(0.0).cpu())
            del p
            ids.append(arg.cpu())
            top.append(lp_max.exp().cpu())
            if targets is not None:
                t = targets[start : start + chunk_size].to(lp.device)
                lps.append(lp.gather(-1, t.unsqueeze(-1)).squeeze(-1).cpu())
            del z, lp
        empty_f = torch.zeros(0)
        return TokenStats(
            entropy=torch.cat(ent) if ent else empty_f,
            logprob=(torch.cat(lps) if lps else empty_f) if targets is not None else None,
            top1_id=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
            top1_prob=torch.cat(top) if top else empty_f,
        )


def token_stats(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    *,
    projection: str = "raw",
    targets: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> TokenStats:
    """Entropy (nats), target log-prob, top-1 id/prob of the policy read off ``hidden`` [..., d] (see module doc)."""
    return Projector(model, projection).stats(hidden, targets=targets, chunk_size=chunk_size, temperature=temperature)
