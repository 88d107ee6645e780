"""``bupo sample``: sample text from an internal layer policy (the paper: internal policies are samplable).

Uses :func:`bupo.internal.internal_policy`: inside it the model's own forward runs only decoder layers
``0..k`` and (projection ``raw``) reads lm_head(H^k) without the final norm, so ``model.generate`` samples
token by token from π^{k+1}_Layer (0-based ``k`` = paper layer ``k + 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEMPLATE_NONE = "none"


def prompt_ids(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """``template="none"``: the prompt verbatim; otherwise the prompt as one user message through ``template``
    (``auto``: :func:`bupo.data.templates.resolve_template`).

    Encoded as every bupo command encodes prompts (:func:`bupo.generation.encode_prompt`: special tokens such as
    BOS are added unless the text already starts with BOS)."""
    from bupo.generation import encode_prompt

    if template == TEMPLATE_NONE:
        text = prompt
    else:
        from bupo.data.templates import render_prompt, resolve_template

        template = resolve_template(tokenizer, template)  # auto: as bupo train and bupo eval pick it
        text = render_prompt(tokenizer, [{"role": "user", "content": prompt}], template)
    ids = encode_prompt(tokenizer, text)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation")
    return ids


def sample_layer(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    layer: int | None,
    projection: str = "raw",
    template: str = "auto",
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    skip_special_tokens: bool = False,
) -> list[str]:
    """``n`` continuations of ``prompt`` sampled from the layer-``layer`` internal policy (``None``: the full model).

    ``temperature=0`` decodes greedily. Seeded: the same arguments give the same text on the same machine.
    """
    import contextlib

    import torch

    from bupo.generation import validate_sampling
    from bupo.internal import internal_policy

    validate_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=None)
    ids = prompt_ids(tokenizer, prompt, template)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * n, dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, attention_mask=torch.ones_like(input_ids))
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    ctx = contextlib.nullcontext(model) if layer is None else internal_policy(model, layer, projection)
    torch.manual_seed(seed)
    with ctx as m, torch.inference_mode():
        out = m.generate(input_ids, **kwargs)
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=skip_special_tokens) for row in out]


def parse_layers(spec: str, num_layers: int) -> list[int | None]:
    """``"5"``, ``"0,3,5"``, ``"all"`` (every layer then the full model) or ``"final"`` -> 0-based layers / None."""
    if spec == "all":
        return [*range(num_layers), None]
    out: list[int | None] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "final":
            out.append(None)
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"--layer must be 0-based ints separated by commas, 'final' or 'all', got {spec!r}") from None
        if not 0 <= k < num_layers:
            raise ValueError(f"--layer {k} out of range: this model has {num_layers} layers, 0-based 0..{num_layers - 1}")
        out.append(k)
    return out


def format_samples(results: Sequence[tuple[int | None, list[str]]], projection: str) -> str:
    lines = []
    for layer, texts in results:
        head = "full model (πθ)" if layer is None else f"layer k={layer} (paper l={layer + 1}, {projection})"
        for i, t in enumerate(texts):
            lines.append(f"=== {head}" + (f" #{i}" if len(texts) > 1 else "") + " ===")
            lines.append(t)
    return "\n".join(lines)
