"""GGUF import: any GGUF that transformers' GGUF loader reads, as a checked fp32 Hugging Face safetensors folder.

:func:`import_gguf` converts and checks the result (weights reload bit-for-bit, tokenizer specials as the GGUF
metadata says, tokenisation round-trips after save and reload). It works around these transformers 5.17 traps:

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

The packaged model names (:mod:`bupo.models.registry`) are converted into the cache with it. Only the standard
library is imported at top level.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bupo.models.registry import MARKER, MARKER_VERSION

__all__ = ["import_gguf"]


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


def _first_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _check_merges(meta: dict[str, Any], src: Path) -> None:
    """One-line ValueError for a BPE merge list that is not pairs ``"left right"`` of tokens whose concatenation is
    a token too (tokenizers would fail with a multi-line error, or build a tokenizer that splits nothing)."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return
    vocab = set(meta.get("tokenizer.ggml.tokens") or ())
    bad = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2 or not all(parts) or any(p not in vocab for p in (*parts, "".join(parts))):
            bad.append(f"#{i} {m!r:.40}")
    if bad:
        raise ValueError(f"{src}: {len(bad)} of the {len(merges)} BPE merges in tokenizer.ggml.merges are not two "
                         f"tokens separated by one space whose concatenation is a token ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}); accepted: a merge list as llama.cpp's converters write "
                         "it, of tokens in tokenizer.ggml.tokens")


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
        return _convert_into(src, meta, arch, out, None, say, _marker_extra)
    from bupo.io import temp_folder  # removed at the end; one a kill -9 left behind goes on the next import

    with temp_folder(out.parent, out.name) as work:
        return _convert_into(src, meta, arch, work, out, say, _marker_extra)


def _convert_into(src: Path, meta: dict[str, Any], arch: str, work: Path, final: Path | None,
                  say: Callable[[str], None], marker_extra: dict | None) -> dict:
    """Convert into ``work``, write the marker, then rename ``work`` to ``final`` (when given; the caller's
    temporary folder removes ``work`` on an error)."""
    record = _convert(src, meta, arch, work, say)
    record.update(marker_extra or {})
    for p in work.iterdir():
        os.chmod(p, 0o644)  # safetensors writes 0600; a cache entry is meant to be shared like any output
    files = {p.name: p.stat().st_size for p in sorted(work.iterdir()) if p.is_file() and p.name != MARKER}
    record.update(version=MARKER_VERSION, files=files, source=src.name, source_bytes=src.stat().st_size)
    from bupo.io import atomic_write_json

    atomic_write_json(work / MARKER, record)
    if final is not None:
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.replace(work, final)
    return record


def _convert_tokenizer(src: Path, meta: dict[str, Any], sentencepiece_bpe: bool,
                       say: Callable[[str], None]) -> tuple[Any, dict, list[int]]:
    """The GGUF's tokenizer (transformers', or SentencePiece BPE rebuilt for Gemma), its special ids fixed from the
    metadata, its chat template set, checked on 'Hello world': ``(tokenizer, special ids, encoding)``."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    _check_merges(meta, src)
    try:
        tok = (_sentencepiece_bpe(meta) if sentencepiece_bpe
               else AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False))
    except Exception as exc:  # noqa: BLE001 - the GGUF's tokenizer metadata is the user's file: one line
        raise ValueError(f"{src}: transformers cannot build the GGUF's tokenizer ({_first_line(exc)}); accepted: "
                         "tokenizer.ggml.* metadata as llama.cpp's converters write it") from None
    ids = _fix_specials(tok, meta)
    tok.chat_template = meta.get("tokenizer.chat_template") or None
    tok.clean_up_tokenization_spaces = False  # destructive for BPE (transformers warns and ignores it anyway)
    enc = _check_tokenizer(tok, ids, meta, "converted tokenizer")
    say(f"bupo: tokenizer ({'rebuilt SentencePiece BPE' if sentencepiece_bpe else meta.get('tokenizer.ggml.model')}) "
        f"'Hello world' -> {enc} [{time.perf_counter() - t0:.0f} s]")
    return tok, ids, enc


@contextlib.contextmanager
def _dequant_bar_follows_hub_bars() -> Iterator[None]:
    """transformers draws its "de-quantizing GGUF tensors" bar with a plain ``tqdm``, which the Hub's progress-bar
    switch does not reach: off too while ``HF_HUB_DISABLE_PROGRESS_BARS`` is set (bupo's commands set it unless
    ``--verbose`` / ``BUPO_VERBOSE=1``, see :mod:`bupo.cli_quiet`)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from bupo.cli_quiet import hub_bars_off

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or not hub_bars_off():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert(src: Path, meta: dict[str, Any], arch: str, out: Path, say: Callable[[str], None]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(src.parent), src.name
    tok_model = meta.get("tokenizer.ggml.model")
    sentencepiece_bpe = tok_model == "llama" and "tokenizer.ggml.merges" not in meta and arch.startswith("gemma")
    tok, ids, enc = _convert_tokenizer(src, meta, sentencepiece_bpe, say)
    template = tok.chat_template

    t0 = time.perf_counter()
    try:
        with _dequant_bar_follows_hub_bars():
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              trust_remote_code=False).eval()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the GGUF's tensors or hyperparameters are the user's: one line
        raise ValueError(f"{src}: transformers cannot load the GGUF's weights ({_first_line(exc)}); accepted: a GGUF "
                         "whose tensors match its architecture's metadata") from None
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
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        a = gguf_model(probe).logits
        b = reloaded(probe).logits
    diff = float((a - b).abs().max())
    if diff > 1e-5 or not torch.isfinite(b).all():
        raise ValueError(f"GGUF import check failed: reloaded weights give different logits (max |diff| {diff:.2e})")
    tok2 = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
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
