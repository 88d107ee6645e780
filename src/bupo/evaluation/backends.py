"""Generation backends for evaluation: batched HF generation (default) and vLLM (optional extra).

Both take the same requests — ``(prompt, row_seed)`` pairs, one per (problem, sample) — and the same
sampling settings (temperature, top_p, top_k, max_new_tokens), and return
:class:`bupo.generation.Completion` objects. Each sample has its own seed in both backends, so a
resumed run regenerates exactly the missing samples. The two backends draw from the same
distribution but not the same random numbers (different kernels and RNGs): for a given seed their
samples differ; compare their scores, not their texts.

vLLM note: vLLM by default fills sampling options a request leaves unset from the model's
``generation_config.json`` (Qwen3's says top_k=20, top_p=0.95, T=0.6). Every option is therefore set
explicitly here (``top_k=-1`` = off), so the paper's T=1.0 / top_p=1.0 really is used. Prompts reach vLLM as the
token ids :func:`bupo.generation.encode_prompt` makes (the rule HF generation uses, not vLLM's own BOS handling), and
generation stops at the same EOS ids (the tokenizer's and the generation config's), so with greedy decoding the
two backends produce the same tokens up to floating-point ties. The engine's set-up (in-process, CPU settings,
install message) is :mod:`bupo.engines`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bupo.generation import Completion, generate_requests, validate_sampling
from bupo.provenance import fingerprint, model_fingerprint  # model_fingerprint re-exported (home: provenance)

__all__ = [
    "BACKENDS",
    "HFBackend",
    "SamplingSettings",
    "VLLMBackend",
    "model_fingerprint",
    "path_fingerprint",
    "require_vllm",
    "vllm_sampling_kwargs",
]

BACKENDS = ("hf", "vllm")
OnBatch = Callable[[list[int], list[Completion]], None]


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings shared by both backends (``top_k=None`` = off, ``temperature=0`` = greedy)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        validate_sampling(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )


def vllm_sampling_kwargs(settings: SamplingSettings, *, seed: int, n: int = 1,
                         stop_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keyword arguments equivalent to ``settings`` for one request."""
    extra = {} if stop_token_ids is None else {"stop_token_ids": [int(t) for t in stop_token_ids]}
    return {**extra,
        "n": n,
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "top_k": -1 if settings.top_k is None else int(settings.top_k),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(settings.max_new_tokens),
        "seed": int(seed),
        "skip_special_tokens": True,
    }


def require_vllm() -> Any:
    """The ``vllm`` module, or ValueError saying how to install it (CPU and GPU) or to use --backend hf."""
    from bupo import engines

    return engines.require_vllm("--backend vllm", instead="use --backend hf")


class HFBackend:
    """Batched, left-padded, per-sample seeded generation with ``model.generate`` (bupo.generation).

    ``policy_layer`` k (0-based): sample from the internal policy pi^k under ``projection`` instead of the model's
    own policy, through the sampler of ``bupo sample --layer`` (:func:`bupo.internal.internal_policy`).
    ``synced``: ranks generating different requests on a sharded model step together
    (:func:`bupo.generation.generate_requests`)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, progress: bool = False,
                 policy_layer: int | None = None, projection: str = "raw", synced: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.policy_layer, self.projection, self.synced = policy_layer, projection, synced

    def generate(
        self, requests: Sequence[tuple[str, int]], settings: SamplingSettings, on_batch: OnBatch | None = None
    ) -> list[Completion]:
        import contextlib

        from bupo.internal import internal_policy

        if self.policy_layer is None:
            policy = contextlib.nullcontext(self.model)
        else:
            policy = internal_policy(self.model, self.policy_layer, self.projection)
        with policy:
            return self._generate(requests, settings, on_batch)

    def _generate(
        self, requests: Sequence[tuple[str, int]], settings: SamplingSettings, on_batch: OnBatch | None
    ) -> list[Completion]:
        return generate_requests(
            self.model,
            self.tokenizer,
            requests,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            batch_size=self.batch_size,
            progress=self.progress,
            on_batch=on_batch,
            synced=self.synced,
        )


class VLLMBackend:
    """vLLM offline generation: one request per (problem, sample) with its own seed, ``batch_size``
    requests per ``LLM.generate`` call (use a large one: vLLM batches internally).

    With a ``tokenizer`` (default: the engine's own, when it has one) prompts are sent as the token ids of
    :func:`bupo.generation.encode_prompt`, checked against the engine's context, and generation stops at
    ``eos_ids`` (default: the tokenizer's EOS) as in the HF backend; without one, as text."""

    name = "vllm"

    def __init__(self, llm: Any, *, tokenizer: Any = None, eos_ids: Sequence[int] | None = None,
                 batch_size: int = 1024, progress: bool = False) -> None:
        self.llm, self.batch_size, self.progress = llm, batch_size, progress
        self._load: Callable[[Sequence[tuple[str, int]], int], Any] | None = None
        if tokenizer is None and callable(getattr(llm, "get_tokenizer", None)):
            tokenizer = llm.get_tokenizer()
        self.tokenizer = tokenizer
        if eos_ids is None and tokenizer is not None:
            from bupo.generation import _eos_ids

            eos_ids = _eos_ids(None, tokenizer)
        self.eos_ids = list(eos_ids) if eos_ids else None

    @classmethod
    def from_path(cls, path: str | Path, *, seed: int = 0, dtype: str = "auto", tokenizer: Any = None,
                  **kwargs: Any) -> VLLMBackend:
        """A backend for the model folder ``path`` whose engine (:func:`bupo.engines.load_llm`) starts at the first
        :meth:`generate`, with a context cut to what those requests need (the KV cache is sized for that, not for
        the model's full context; nothing starts when a resumed run has nothing left to generate). Stop ids: the
        tokenizer's and the folder's generation config's EOS."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from bupo.engines import load_llm
        from bupo.generation import _eos_ids, context_length, encode_prompt

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        try:
            gen = GenerationConfig.from_pretrained(str(path))
        except OSError:
            gen = None
        context = context_length(AutoConfig.from_pretrained(str(path), trust_remote_code=False))

        def load(requests: Sequence[tuple[str, int]], max_new_tokens: int) -> Any:
            longest = max(len(encode_prompt(tokenizer, p)) for p in {p for p, _ in requests})
            need = longest + max_new_tokens
            return load_llm(path, dtype=dtype, seed=seed, max_model_len=need if context is None else min(context, need))

        backend = cls(None, tokenizer=tokenizer, eos_ids=_eos_ids(SimpleNamespace(generation_config=gen), tokenizer),
                      **kwargs)
        backend._load = load
        return backend

    def _prompts(self, chunk: Sequence[tuple[str, int]], max_new_tokens: int) -> list[Any]:
        if self.tokenizer is None:
            return [p for p, _ in chunk]
        from bupo.generation import check_context, encode_prompt

        ids = [encode_prompt(self.tokenizer, p) for p, _ in chunk]
        if any(not x for x in ids):
            raise ValueError("a prompt tokenises to nothing; a prompt needs at least one token")
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        check_context([len(x) for x in ids], max_new_tokens, getattr(config, "max_model_len", None))
        return [{"prompt_token_ids": x} for x in ids]

    def generate(
        self, requests: Sequence[tuple[str, int]], settings: SamplingSettings, on_batch: OnBatch | None = None
    ) -> list[Completion]:
        vllm = require_vllm()
        if self.llm is None and self._load is not None and requests:
            self.llm = self._load(requests, settings.max_new_tokens)
        out: list[Completion] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate (vllm)", unit="seq")
        try:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                params = [vllm.SamplingParams(**vllm_sampling_kwargs(settings, seed=s, stop_token_ids=self.eos_ids))
                          for _, s in chunk]
                results = self.llm.generate(self._prompts(chunk, settings.max_new_tokens), params, use_tqdm=False)
                done = []
                for r in results:
                    o = r.outputs[0]
                    reason = "stop" if o.finish_reason == "stop" else "length"
                    done.append(Completion(text=o.text, token_ids=list(o.token_ids), finish_reason=reason))
                out.extend(done)
                if on_batch is not None:
                    on_batch(list(range(start, start + len(chunk))), done)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return out


def path_fingerprint(path: str | Path) -> str:
    """Identity of a model folder without loading it: its config and the names, sizes and mtimes of its files."""
    p = Path(path)
    parts = [str(p.resolve()).encode()]
    for f in sorted(p.iterdir()) if p.is_dir() else []:
        if f.is_file():
            st = f.stat()
            parts.append(json.dumps([f.name, st.st_size, int(st.st_mtime)]).encode())
            if f.name == "config.json":
                parts.append(f.read_bytes())
    return fingerprint(b"".join(parts))
