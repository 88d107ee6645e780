"""The internal layer policy, as a context manager and as functions.

Paper Eq. 5: pi^l_Layer = softmax(H^l E_u^T) — the residual stream after paper layer ``l`` read through the
unembedding, **without** the final norm (projection ``"raw"``, the paper and the official code). The logit-lens
variant ``"final_norm"`` reads lm_head(final_norm(H^l)). Both apply the model's own softcap.

Layer indices are 0-based as in the official code: ``layer=k`` is paper layer ``l = k + 1`` and, for
``k < L - 1``, the raw internal logits equal ``lm_head(hidden_states[k + 1])`` of a full forward.

:func:`internal_policy` is the whole mechanism: while it is active the model's *own* forward runs only
decoder layers ``0..k`` (it truncates ``config.num_hidden_layers``) and, for ``raw``, returns the final norm's
input unchanged. Because nothing calls submodules directly, wrappers (DDP, FSDP2, DeepSpeed), TRL's fused LM
head, gradient checkpointing and ``generate`` keep working; layers above ``k`` and the final norm never run, so
they get no gradient (``grad is None``) and cost nothing.

The context mutates the model's config: it is process-global for that model. Never run it concurrently with
another use of the same model (e.g. asynchronous rollout generation) nor under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from bupo.internal.adapters import check_projection, parts


class InternalPolicyError(RuntimeError):
    """A layer above the internal layer ran while an internal policy was active (unsupported family)."""


def check_layer(layer, num_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int (0-based, paper layer = layer + 1), got {layer!r}")
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"layer {layer} out of range: this model has {num_layers} decoder layers, so layer must be in "
            f"0..{num_layers - 1} (0-based as in the official code; paper layer l = layer + 1)"
        )
    return layer


@contextlib.contextmanager
def internal_policy(model: nn.Module, layer: int, projection: str = "raw") -> Iterator[nn.Module]:
    """Make ``model(...)`` (and ``model.generate``) return the layer-``layer`` internal policy.

    ``model`` may be the HF model or a DDP/DeepSpeed wrapper around it; the HF model is modified in place and
    always restored on exit, also when the body raises. Yields the (unwrapped) HF model.
    """
    p = parts(model)
    check_projection(projection)
    check_layer(layer, p.num_layers)
    if not p.adapter.truncatable:
        raise InternalPolicyError(
            f"model_type {p.model.config.model_type!r} does not loop over config.num_hidden_layers; "
            "its internal policy cannot be taken by truncation"
        )
    configs = {id(c): c for c in (p.model.config, p.text_config)}.values()
    saved = [(c, c.num_hidden_layers) for c in configs]
    handles = []
    try:
        for c in configs:
            c.num_hidden_layers = layer + 1
        if projection == "raw":
            # skip the final norm: its output is replaced by its input (paper Eq. 5 has no LN)
            handles.append(p.final_norm.register_forward_hook(lambda mod, args, out: args[0]))
        if layer + 1 < p.num_layers:
            # guard: a family that ignores the truncation must fail loudly, not return the full policy
            def _refuse(mod, args):
                raise InternalPolicyError(
                    f"decoder layer {layer + 1} ran while the layer-{layer} internal policy was active: "
                    f"{type(p.model).__name__} does not honour config.num_hidden_layers"
                )

            handles.append(p.layers[layer + 1].register_forward_pre_hook(_refuse))
        yield p.model
    finally:
        for h in handles:
            h.remove()
        for c, n in saved:
            c.num_hidden_layers = n


def _check_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    """Integer ids in [0, vocab): an out-of-range id would index past the embedding (a device-side assert on CUDA,
    a cryptic IndexError on CPU). One min/max reduction and one host sync."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (a LongTensor), got dtype {ids.dtype}")
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds the token id {bad}; ids must be in 0..{vocab - 1} (this model's vocabulary)")


def _check_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor [batch, seq]")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token per sequence")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
        )
    _check_ids("input_ids", input_ids, parts(model).embed.num_embeddings)


def layer_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layer: int,
    projection: str = "raw",
) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the layer-``layer`` internal policy (0-based; paper layer ``layer + 1``).

    Differentiable; runs only decoder layers ``0..layer``. ``projection="raw"``: lm_head(H^l) (the paper);
    ``"final_norm"``: lm_head(final_norm(H^l)) (logit lens). The model's softcap is applied in both.
    Sequences longer than the model's ``max_position_embeddings`` are rejected (ValueError).
    """
    _check_inputs(model, input_ids, attention_mask)
    from bupo.generation import context_length

    ctx = context_length(model)
    if ctx is not None and input_ids.shape[-1] > ctx:
        raise ValueError(f"input_ids has {input_ids.shape[-1]} positions, more than the model's "
                         f"max_position_embeddings {ctx}; truncate or split the sequences")
    with internal_policy(model, layer, projection):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits


def layer_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layer: int,
    projection: str = "raw",
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities (nats) of ``targets`` under the layer-``layer`` internal policy at ``temperature``.

    By default the targets are the next tokens: the result is [batch, seq - 1] with element t = log pi^k(x_{t+1} |
    x_{<=t}). With explicit ``targets`` of shape [batch, seq] the result is [batch, seq]. Differentiable.
    """
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if (targets is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.numel()
            and input_ids.size(1) < 2):
        raise ValueError("input_ids needs at least 2 tokens per sequence for next-token log-probs (or give targets)")
    if targets is not None and (not isinstance(targets, torch.Tensor)
                                or targets.shape != getattr(input_ids, "shape", None)):
        raise ValueError(f"targets shape {tuple(getattr(targets, 'shape', ()))} must equal input_ids shape "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    logits = layer_logits(model, input_ids, attention_mask, layer=layer, projection=projection)
    if targets is None:
        logits, targets = logits[:, :-1], input_ids[:, 1:]
    else:
        _check_ids("targets", targets, logits.size(-1))
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
