"""The logit-lens table: the top tokens of every layer's policy under ``raw`` and ``final_norm``, side by side.

For a token sequence and a few positions, each 0-based layer ``k`` (paper layer ``k + 1``) gets, per projection,
its entropy (nats) and its top tokens with their probabilities. ``raw`` = lm_head(H^k) (the paper's internal
policy, no norm), ``final_norm`` = lm_head(final_norm(H^k)) (the logit lens); at ``k = L - 1`` ``final_norm`` is
the model's own policy. One forward (:func:`bupo.internal.capture_streams`) and the projections of
:class:`bupo.internal.Projector`, the same ones ``bupo analyze`` and BuPO's internal policy use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bupo.internal.adapters import PROJECTIONS


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def lens_table(
    model: Any,
    tokenizer: Any,
    ids: Sequence[int],
    *,
    positions: Sequence[int] | None = None,
    top: int = 5,
    projections: Sequence[str] = PROJECTIONS,
    sample: int | None = None,
) -> dict[str, Any]:
    """Per position, per 0-based layer, per projection: ``{"entropy": nats, "top": [[token, prob], ...]}``.

    ``ids``: the token ids fed to the model; ``positions``: indices into them (negative from the end; default the
    last), each position's policy predicting the token after it. Returns a JSON-ready dict with ``positions``,
    ``context`` (the last few tokens up to each position), ``next_token`` (the actual next token when ``ids``
    continues), ``layers`` and ``projections``.
    """
    import torch

    from bupo.generation import eval_mode
    from bupo.internal import Projector, capture_streams, parts
    from bupo.internal.adapters import check_projection
    from bupo.internal.sharding import full_shape

    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    for pr in projections:
        check_projection(pr)
    ids = [int(t) for t in ids]
    T = len(ids)
    if T == 0:
        raise ValueError("the lens needs at least one token")
    positions = [-1] if positions is None else list(positions)
    pos = []
    for p in positions:
        if not isinstance(p, int) or not -T <= p < T:
            raise ValueError(f"position {p!r} out of range for {T} tokens (accepted: -{T}..{T - 1})")
        pos.append(p % T)
    mp = parts(model)
    L = mp.num_layers
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[0, pos] = True
    order = sorted(set(pos))  # capture_streams returns the selected rows in sequence order
    with eval_mode(model), torch.inference_mode():
        with capture_streams(model, streams=["resid_post"], positions=mask) as store:
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        k_top = min(top, int(full_shape(mp.lm_head.weight)[0]))
        per_proj: dict[str, list[tuple[Any, Any, Any]]] = {}
        for pr in projections:
            proj = Projector(model, pr, epilogue="eager")
            rows = []
            with proj.held():  # a sharded lm_head: gathered once for all layers
                for k in range(L):
                    z = proj.logits(store[("resid_post", k)]).float()
                    logp = torch.log_softmax(z, dim=-1)
                    ent = -(logp.exp() * logp).sum(-1)
                    vals, idx = logp.topk(k_top, dim=-1)
                    rows.append((ent.cpu(), vals.exp().cpu(), idx.cpu()))
            per_proj[pr] = rows
    table = []
    for p in pos:
        r = order.index(p)
        layers = []
        for k in range(L):
            cell = {}
            for pr in projections:
                ent, probs, idx = per_proj[pr][k]
                cell[pr] = {"entropy": round(float(ent[r]), 4),
                            "top": [[_token_text(tokenizer, i), float(f"{q:.4g}")]  # 4 significant digits
                                    for i, q in zip(idx[r].tolist(), probs[r].tolist(), strict=True)]}
            layers.append({"layer": k, "paper_layer": k + 1, **cell})
        table.append({
            "position": p,
            "context": tokenizer.decode(ids[max(0, p - 7): p + 1]),
            "next_token": _token_text(tokenizer, ids[p + 1]) if p + 1 < T else None,
            "layers": layers,
        })
    return {"sample": sample, "projections": list(projections), "top": k_top, "num_layers": L,
            "conventions": "0-based layer k (paper layer k+1); entropy in nats; raw = lm_head(h), final_norm = "
                           "lm_head(final_norm(h)); at k = L-1 final_norm is the model's own policy",
            "positions": table}


def prob_text(q: float) -> str:
    """A probability as text that never reads as 0 when it is not: ``0.23``, ``0.004``, ``3.2e-05``, ``0``."""
    if q == 0:
        return "0"
    if q >= 0.01:
        return f"{q:.2f}"
    if q >= 0.001:
        return f"{q:.3f}"
    return f"{q:.1e}"


def _fit_tokens(entropy: float, top: Sequence[Sequence[Any]], width: int) -> str:
    """``" 2.31 'a':0.52 'b':0.1"``: the entropy and as many whole ``token:prob`` pairs as fit in ``width`` (a pair
    is never cut, so a probability is never shortened; ``…`` marks pairs left out)."""
    text = f"{entropy:6.2f}"
    pairs = [f"{t!r}:{prob_text(q)}" for t, q in top]
    for i, pair in enumerate(pairs):
        more = " …" if i + 1 < len(pairs) else ""
        if len(text) + 1 + len(pair) + len(more) > width:
            return (text + " …") if len(text) + 2 <= width else text
        text += " " + pair
    return text


def format_lens(table: Mapping[str, Any], *, width: int = 44) -> str:
    """The lens table as plain text: one block per position, one row per layer, projections side by side."""
    projs = table["projections"]
    out = []
    for block in table["positions"]:
        nxt = "" if block["next_token"] is None else f", actual next token {block['next_token']!r}"
        out.append(f"position {block['position']} (context …{block['context']!r}{nxt}); "
                   "k 0-based (paper l = k+1), H in nats")
        head = f"{'k':>3} {'l':>3} | " + " | ".join(f"{p + ': H  top tokens':<{width}}" for p in projs)
        out.append(head)
        out.append("-" * len(head))
        for row in block["layers"]:
            cells = []
            for p in projs:
                c = row[p]
                cells.append(_fit_tokens(c["entropy"], c["top"], width).ljust(width))
            out.append(f"{row['layer']:>3} {row['paper_layer']:>3} | " + " | ".join(cells))
        out.append("")
    return "\n".join(out).rstrip() + "\n"
