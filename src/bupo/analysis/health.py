"""A quick check, before training, that an internal layer policy is readable at all (one short forward).

``bupo analyze`` records the same verdict over its response tokens (``summary["projection_health"]``, rule in
:data:`bupo.analysis.summary.HEALTH_RULE`); this check needs no generation: it projects the residual stream of a
few prompts' tokens (position t predicts token t + 1) through one projection at every layer, so ``bupo train``
can name a degenerate projection, with its numbers, before the first rollout. Layers 0-based ``k`` (paper layer
``k + 1``), entropies in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bupo.analysis.summary import layer_collapsed, projection_advice, projection_health

DEFAULT_POSITIONS = 32  # per prompt: the last ones (the chat template's head is the same in every prompt)


def quick_health(model: Any, tokenizer: Any, prompts: Sequence[str], *, projection: str = "raw",
                 positions_per_prompt: int = DEFAULT_POSITIONS) -> dict[str, Any]:
    """:func:`bupo.analysis.summary.projection_health` measured on the tokens of ``prompts`` (rendered text)."""
    import torch

    from bupo.analysis.run import _norm_weight_stats
    from bupo.generation import encode_prompt, eval_mode
    from bupo.internal import parts, stream_stats, tap
    from bupo.internal.adapters import check_projection
    from bupo.internal.sharding import full_parameters, gathered_model

    check_projection(projection)
    seqs = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) if len(ids) >= 2]
    if not seqs:
        raise ValueError("the projection check needs at least one prompt of two or more tokens")
    p = parts(model)
    L = p.num_layers
    device = next(model.parameters()).device
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        pos[b, max(0, len(s) - 1 - positions_per_prompt): len(s) - 1] = True  # every selected t has a token t+1
    targets = torch.roll(ids, -1, dims=1)
    ids, mask, pos, targets = (t.to(device) for t in (ids, mask, pos, targets))
    index = pos.reshape(-1).nonzero().squeeze(1)
    rms: dict[int, float] = {}

    def residual_rms(stream, layer, t):
        rms[layer] = float(t.reshape(-1, t.shape[-1]).index_select(0, index).float().pow(2).mean(-1).sqrt().mean())

    # gathered_model: under ZeRO-3 this runs before the trainer exists, on partitions no engine hook fetches
    with gathered_model(model), eval_mode(model), torch.inference_mode():
        with tap(model, [("resid_post", k) for k in range(L)], residual_rms):
            st = stream_stats(model, ids, mask, streams=("resid_post",), positions=pos, targets=targets,
                              projection=projection)
        with full_parameters(p.model, p.final_norm):
            norm_gain = _norm_weight_stats(p.final_norm)
    final_top1 = st.final.top1_id
    per = [st.stats[("resid_post", k)] for k in range(L)]
    stats = {
        "layer_entropy": [float(s.entropy.double().mean()) for s in per],
        "layer_top1_agreement": [float((s.top1_id == final_top1).double().mean()) for s in per],
        "layer_logprob": [float(s.logprob.double().mean()) for s in per],
        "final_entropy": float(st.final.entropy.double().mean()),
        "resid_rms": [rms[k] for k in range(L)],
    }
    out = projection_health(stats, projection=projection, final_norm_weight=norm_gain)
    out["num_tokens"] = int(st.num_positions)
    out["measured_on"] = f"the last <= {positions_per_prompt} tokens of {len(seqs)} prompts (one forward)"
    return out


def check_layer(health: dict[str, Any], layer: int) -> str | None:
    """A one-line warning when ``layer``'s policy is collapsed or the whole projection degenerate, else None."""
    H = health["layer_entropy"][layer]
    agree = health["layer_top1_agreement"][layer]
    hf = health["final_entropy"]
    proj = health["projection"]
    if not (health["degenerate"] or layer_collapsed(H, agree, hf)):
        return None
    msg = (f"the {proj} internal policy at k = {layer} (paper layer {layer + 1}) is near one-hot and disagrees with "
           f"the model's own policy: entropy {H:.3g} nats vs {hf:.3g} for the model's output, top-1 agreement "
           f"{agree:.2f}, realised-token log-prob {health['layer_logprob'][layer]:.4g}")
    if health.get("resid_rms") and health.get("final_norm_gain_rms"):
        msg += f", residual RMS {health['resid_rms'][layer]:.3g} vs final-norm gain {health['final_norm_gain_rms']:.3g}"
    msg += f" (measured on {health.get('measured_on', 'the analysis tokens')})"
    msg += f"; {health.get('advice') or projection_advice(proj)}"
    return msg
