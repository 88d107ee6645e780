"""Batched, seeded, left-padded sampling from a Hugging Face causal LM (shared by analysis and eval).

Conventions:

- Prompts are strings, already rendered with :func:`bupo.data.templates.render_prompt`. They are
  tokenised without adding special tokens when they already start with the tokenizer's BOS token
  (chat templates that write it themselves) and with the tokenizer's defaults otherwise.
- Every sequence has its own random stream, seeded by ``sample_seed(seed, prompt_key, sample_index)``
  (``prompt_key`` defaults to the prompt's position in the call): the sample drawn for
  (prompt, sample index) does not depend on the batch size, the order of requests, or which other
  requests share its batch — up to floating-point differences of batched kernels. That is what lets
  ``bupo eval`` resume an interrupted run and still produce the same samples.
- Sampling: logits (fp32) / temperature, then top-k, then top-p (the smallest set of most likely
  tokens whose probability reaches ``top_p``), then one inverse-CDF draw from the row's stream: over the
  tokens sorted by probability when top-k or top-p truncates, over the vocabulary in id order otherwise
  (no sort; the same distribution, other draws for the same seed).
  ``temperature=0`` is greedy. Sampling runs inside ``model.generate`` as a logits processor that
  leaves only the drawn token, with greedy search; the model's own ``generation_config`` sampling
  defaults (repetition penalty, top-k, ...) are NOT applied — only the settings given here.
- Generation stops at any EOS id of the tokenizer or the model's generation config, or after
  ``max_new_tokens``. ``Completion.token_ids`` include the EOS token when one was generated
  (``finish_reason="stop"``; ``"length"`` = truncated); ``text`` is decoded with
  ``skip_special_tokens=True``.
- The model is put in eval mode for the call (and restored), under ``torch.inference_mode`` (``torch.no_grad`` for an
  FSDP2 / ZeRO-3 model: :func:`bupo.internal.sharding.inference`).
- Length against context: a prompt plus ``max_new_tokens`` beyond the model's ``max_position_embeddings``
  (:func:`context_length`) is an error here (:func:`check_context`); callers that prefer to drop such prompts
  (training, analysis) filter them first with :func:`fits_context` and count what they drop.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Completion", "check_context", "context_length", "encode_prompt", "eval_mode", "fits_context", "generate",
           "generate_requests", "sample_seed", "validate_sampling"]


@dataclass(frozen=True)
class Completion:
    """One sampled response: decoded ``text``, generated ``token_ids`` (EOS included when generated)
    and ``finish_reason`` ("stop" at EOS, "length" at ``max_new_tokens``)."""

    text: str
    token_ids: list[int]
    finish_reason: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason}


def sample_seed(seed: int, prompt_key: int | str, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) pair, stable across platforms and Python versions."""
    h = hashlib.blake2b(f"{seed}|{prompt_key}|{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def validate_sampling(
    *, n: int = 1, max_new_tokens: int, temperature: float, top_p: float, top_k: int | None
) -> None:
    """ValueError for settings outside: n >= 1, max_new_tokens >= 1, finite temperature >= 0, 0 < top_p <= 1,
    top_k None or >= 1."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        # inf would sample uniformly over the vocabulary, NaN would poison every probability
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (off) or an integer >= 1, got {top_k!r}")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; every module's own ``training`` flag is restored on exit,
    so a model handed in by a training loop (even one with some submodules frozen in eval) comes back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if source is None:
            continue
        for i in source if isinstance(source, list | tuple) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos_ids:
        return eos_ids[0]  # masked out anyway: left padding sits under attention_mask = 0
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt text -> token ids, the one rule every bupo command uses for prompts: the tokenizer's special
    tokens (e.g. BOS) are added unless ``text`` already starts with the BOS token (chat templates that write
    it themselves). An empty list is returned as is; callers decide whether that is an error or a skip."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def context_length(model_or_config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its text config), or None if it declares none.

    Accepts a model or a config. Positions past it are out of what the model was trained on (learned position
    tables fail outright; RoPE extrapolates silently), so bupo never generates or scores beyond it.
    """
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def fits_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> bool:
    """Whether a prompt of ``prompt_tokens`` plus ``max_new_tokens`` generated tokens fits in ``context``."""
    return context is None or prompt_tokens + max_new_tokens <= context


def check_context(prompt_lengths: Sequence[int], max_new_tokens: int, context: int | None, *,
                  what: str = "prompts") -> None:
    """ValueError (one line, what to change) when any prompt + ``max_new_tokens`` exceeds ``context`` tokens."""
    if context is None or not prompt_lengths:
        return
    over = [n for n in prompt_lengths if not fits_context(n, max_new_tokens, context)]
    if over:
        longest = max(over)
        raise ValueError(
            f"{len(over)} of {len(prompt_lengths)} {what} do not fit the model's context: the longest is {longest} "
            f"tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} > max_position_embeddings "
            f"{context}; lower max_new_tokens to at most {max(0, context - longest)} or use shorter prompts"
        )


class _RowSampler:
    """Logits processor: draws one token per row from that row's own random stream and returns scores
    that are -inf everywhere else, so greedy search takes exactly the drawn token."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, top_k: int | None) -> None:
        import torch

        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float()
        if self.temperature == 0:
            chosen = scores.argmax(dim=-1)
        else:
            logits = scores / self.temperature
            vocab = logits.shape[-1]
            if self.top_k is not None and self.top_k < vocab:
                kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            # one uniform per row from the row's own CPU generator: cheap and independent of the batch
            u = torch.tensor([float(torch.rand((), generator=g)) for g in self.generators], dtype=probs.dtype)
            u = u.to(probs.device)
            if self.top_p >= 1.0 and self.top_k is None:
                # no truncation: the inverse CDF in vocabulary order is the same distribution, without the
                # full-vocabulary sort (0.35 s a step at 8 x 262k on a CPU)
                cdf = torch.cumsum(probs, dim=-1)
                pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
                # float round-off can land past the last token with mass; step back onto it
                last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
                chosen = torch.minimum(pos, last)
            else:
                sorted_p, order = torch.sort(probs, dim=-1, descending=True)
                if self.top_p < 1.0:
                    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
                    sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
                cdf = torch.cumsum(sorted_p, dim=-1)
                pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
                kept = (sorted_p > 0).sum(dim=-1)
                pos = torch.minimum(pos, kept - 1).clamp_min(0)
                chosen = order.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


def _model_device(model: Any) -> Any:
    import torch

    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode_requests(tokenizer: Any, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    """Token ids of each distinct prompt (a prompt must be a string of at least one token)."""
    encoded: dict[str, list[int]] = {}
    for prompt, _ in requests:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        if prompt not in encoded:
            ids = encode_prompt(tokenizer, prompt)
            if not ids:
                raise ValueError(f"the prompt {prompt[:60]!r} tokenises to nothing; a prompt needs at least one token")
            encoded[prompt] = ids
    return encoded


def _completion(tokenizer: Any, row: list[int], eos_ids: Any, max_new_tokens: int) -> Completion:
    """One generated row cut at its first EOS (kept), or at ``max_new_tokens`` (``finish_reason="length"``)."""
    cut = next((t for t, tok in enumerate(row) if tok in eos_ids), None)
    if cut is None:
        # generate() pads finished rows; an unfinished row is exactly max_new_tokens long
        tokens, reason = row[:max_new_tokens], "length"
    else:
        tokens, reason = row[: cut + 1], "stop"
    return Completion(text=tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens, finish_reason=reason)


def generate_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    on_batch: Callable[[list[int], list[Completion]], None] | None = None,
    synced: bool = False,
) -> list[Completion]:
    """One completion per ``(prompt, row_seed)`` request (see :func:`sample_seed` for row seeds).

    Requests are sorted by prompt length (less padding) and run ``batch_size`` at a time;
    ``on_batch(indices, completions)`` is called after each batch with the request indices it
    finished (``bupo eval`` appends them to its samples file). Returns completions in request order.
    ``synced``: transformers' ``synced_gpus``: every rank of the default process group keeps stepping until all
    ranks' batches are done (an FSDP2 forward is a collective, so ranks generating different requests must run the
    same number of forwards); each rank must then run the same number of batches.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from bupo.internal.sharding import inference

    validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not requests:
        return []
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    encoded = _encode_requests(tokenizer, requests)
    check_context([len(ids) for ids in encoded.values()], max_new_tokens, context_length(model))
    order = sorted(range(len(requests)), key=lambda i: (len(encoded[requests[i][0]]), i))
    device = _model_device(model)
    gen_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
    )
    results: list[Completion | None] = [None] * len(requests)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="generate", unit="seq")
    # generate() fills every unset option from model.generation_config (e.g. Qwen3's repetition and
    # top-k defaults); swap in a blank one for the call so only the settings given here apply
    saved_config = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids or None, pad_token_id=pad_id)
    try:
        with eval_mode(model), inference(model):  # torch.no_grad() on a sharded model (FSDP2 reuses its buffers)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids = [encoded[requests[i][0]] for i in idx]
                width = max(len(x) for x in ids)
                input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
                attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
                sampler = _RowSampler([requests[i][1] for i in idx], temperature, top_p, top_k)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    generation_config=gen_config,
                    logits_processor=LogitsProcessorList([sampler]),
                    synced_gpus=synced,
                )
                new = out[:, width:].tolist()
                batch_done = []
                for row, i in zip(new, idx, strict=True):
                    results[i] = _completion(tokenizer, row, eos_ids, max_new_tokens)
                    batch_done.append(results[i])
                if on_batch is not None:
                    on_batch(list(idx), batch_done)
                if bar is not None:
                    bar.update(len(idx))
    finally:
        model.generation_config = saved_config
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    prompt_keys: Sequence[int | str] | None = None,
) -> list[list[Completion]]:
    """``n`` completions for each prompt: ``result[i][j]`` is sample ``j`` of ``prompts[i]``.

    Seeded per sample with ``sample_seed(seed, prompt_keys[i], j)`` (``prompt_keys`` default to the
    prompt positions), so the same call gives the same outputs whatever the batch size.
    ``temperature=0`` is greedy (all ``n`` samples are then identical). See the module docstring for
    padding, EOS and decoding conventions.
    """
    validate_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} prompt_keys")
    requests = [(p, sample_seed(seed, keys[i], j)) for i, p in enumerate(prompts) for j in range(n)]
    flat = generate_requests(
        model,
        tokenizer,
        requests,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        progress=progress,
    )
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
