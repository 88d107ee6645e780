"""Generation backends for evaluation: batched HF generation (default) and vLLM (optional extra).

Both take the same requests — ``(prompt, row_seed)`` pairs, one per (problem, sample) — and the same
sampling settings (temperature, top_p, top_k, max_new_tokens), and return
:class:`bupo.generation.Completion` objects. Each sample has its own seed in both backends, so a
resumed run regenerates exactly the missing samples. The two backends draw from the same
distribution but not the same random numbers (different kernels and RNGs): for a given seed their
samples differ; compare their scores, not their texts.

vLLM note: vLLM by default fills sampling options a request leaves unset from the model's
``generation_config.json`` (Qwen3's says top_k=20, top_p=0.95, T=0.6). Every option is therefore set
explicitly here (``top_k=-1`` = off), so the paper's T=1.0 / top_p=1.0 really is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def vllm_sampling_kwargs(settings: SamplingSettings, *, seed: int, n: int = 1) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keyword arguments equivalent to ``settings`` for one request."""
    return {
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
    """The ``vllm`` module, or ValueError saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ValueError(
            "backend 'vllm' needs the vllm package, which is not installed: pip install 'bupo[vllm]' "
            "(needs a CUDA GPU); or use --backend hf"
        ) from exc
    return vllm


class HFBackend:
    """Batched, left-padded, per-sample seeded generation with ``model.generate`` (bupo.generation)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, progress: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress

    def generate(
        self, requests: Sequence[tuple[str, int]], settings: SamplingSettings, on_batch: OnBatch | None = None
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
        )


class VLLMBackend:
    """vLLM offline generation: one request per (problem, sample) with its own seed, ``batch_size``
    requests per ``LLM.generate`` call (use a large one: vLLM batches internally)."""

    name = "vllm"

    def __init__(self, llm: Any, *, batch_size: int = 1024, progress: bool = False) -> None:
        self.llm, self.batch_size, self.progress = llm, batch_size, progress

    @classmethod
    def from_path(cls, path: str | Path, *, seed: int = 0, dtype: str = "auto", **kwargs: Any) -> VLLMBackend:
        vllm = require_vllm()
        llm = vllm.LLM(model=str(path), seed=seed, dtype=dtype)
        return cls(llm, **kwargs)

    def generate(
        self, requests: Sequence[tuple[str, int]], settings: SamplingSettings, on_batch: OnBatch | None = None
    ) -> list[Completion]:
        vllm = require_vllm()
        out: list[Completion] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate (vllm)", unit="seq")
        try:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                params = [vllm.SamplingParams(**vllm_sampling_kwargs(settings, seed=s)) for _, s in chunk]
                results = self.llm.generate([p for p, _ in chunk], params, use_tqdm=False)
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
