"""Does a loaded model hold the weights of its checkpoint? The checks :func:`bupo.models.load.load_model` runs.

transformers loads a checkpoint whose config disagrees with its weights anyway: missing tensors are randomly
initialised, unexpected ones dropped, and only a logged "LOAD REPORT" says so; an int32 checkpoint is cast to the
float dtype without a word; NaN/inf weights load as they are. Analysis, evaluation and training would then run and
print numbers of a model that is not the checkpoint. Each check here raises one ValueError line instead, naming a
few offending tensors and their count:

- :func:`check_loading_info`: transformers' own loading info (``output_loading_info=True``): missing, unexpected
  and shape-mismatched tensors and load errors. Tied weights (lm_head = embeddings) and non-persistent buffers
  (rotary ``inv_freq``) are not in it: transformers already leaves them out.
- :func:`check_checkpoint_dtypes`: the safetensors headers' dtypes (no tensor is read): integer or bool weights
  are refused unless the config declares a quantisation (its packed integer tensors are expected).
- :func:`check_finite`: one reduction per parameter (its sum, no copy of the weights): NaN/inf show in it.
- :func:`check_vocab`: a tokenizer with more tokens than the embedding has rows (another model's tokenizer).

:func:`quiet_load_report` keeps transformers' multi-line report off stderr while the one-line error says it.
Only the standard library is imported at top level.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["check_checkpoint_dtypes", "check_finite", "check_loading_info", "check_vocab", "few",
           "quiet_load_report"]

# safetensors dtype codes of floating-point tensors (F8_* are the fp8 formats)
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_FIX = "re-save the model, or fix config.json so that it describes these weights"


def few(names: Iterable[str], n: int = 3) -> str:
    """``'a', 'b', 'c' and 7 more`` for a message."""
    names = sorted(names)
    head = ", ".join(repr(s) for s in names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """ValueError (one line) when transformers' loading info reports tensors of the config's model that the
    checkpoint lacks, checkpoint tensors the model has no place for, shapes that differ, or load errors."""
    problems = []
    missing = set(info.get("missing_keys") or ())
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model missing from the checkpoint ({few(missing)})")
    unexpected = set(info.get("unexpected_keys") or ())
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) the model has no place for ({few(unexpected)})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        name, ckpt, model = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) of another shape ({few(m[0] for m in mismatched)}; "
                        f"{name!r} is {list(ckpt)} in the checkpoint, {list(model)} in the model)")
    errors = list(info.get("error_msgs") or ())
    if errors:
        problems.append(f"{len(errors)} load error(s) ({str(errors[0]).splitlines()[0][:160]})")
    if problems:
        raise ValueError(f"{where}: the weights do not match config.json: {'; '.join(problems)}; {_FIX}")


def _safetensors_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype code, from the headers of the folder's safetensors files."""
    from bupo.models.load import safetensors_header, weight_shards

    out: dict[str, str] = {}
    for shard in weight_shards(folder):
        if shard.suffix == ".safetensors":
            header = safetensors_header(shard)
            out.update({k: str(v.get("dtype")) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return out


def check_checkpoint_dtypes(folder: Path, where: str) -> None:
    """ValueError (one line) for integer / bool weights in a checkpoint whose config declares no quantisation
    (transformers would cast them to floats silently: the numbers are not weights)."""
    with contextlib.suppress(OSError, ValueError):
        if "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            return
    bad = {k: d for k, d in _safetensors_dtypes(folder).items() if d not in _FLOAT_CODES and not d.startswith("F8")}
    if bad:
        kinds = ", ".join(sorted(set(bad.values())))
        raise ValueError(f"{where}: {len(bad)} weight tensor(s) are not floating point ({kinds}: {few(bad)}) and "
                         "config.json declares no quantization_config; accepted: float weights (F32, F16, BF16, "
                         "F64, F8) or a quantised checkpoint that says so")


def _parameters(model: Any) -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen and p.is_floating_point() and p.device.type != "meta":
            seen.add(id(p))
            yield name, p


def check_finite(model: Any, where: str) -> None:
    """ValueError (one line) naming the parameters holding NaN or inf.

    One pass over the weights: each parameter is summed in its own dtype, which reads it in place (no copy) and
    propagates any NaN/inf. A sum that overflowed (finite weights, a non-finite total: large fp16 tensors) is told
    apart by ``isfinite`` on that parameter alone."""
    import torch

    bad: dict[str, int] = {}
    with torch.no_grad():
        for name, p in _parameters(model):
            if not bool(torch.isfinite(p.sum())):
                n = int((~torch.isfinite(p)).sum())
                if n:
                    bad[name] = n
    if bad:
        first = sorted(bad)[0]
        raise ValueError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf ({few(bad)}; {first!r} has "
                         f"{bad[first]} non-finite value(s)); accepted: finite weights (re-save or re-download "
                         "the checkpoint)")


def check_vocab(tokenizer: Any, rows: int | None, where: str) -> None:
    """ValueError (one line) when the tokenizer has token ids past the ``rows`` of the model's embedding: the
    tokenizer is another model's (its ids would index past the embedding or read other tokens' rows)."""
    if tokenizer is None or not rows:
        return
    n = len(tokenizer)
    if n > rows:
        raise ValueError(f"{where}: the tokenizer has {n} tokens but the model's embedding has {rows} rows: the "
                         "tokenizer belongs to another model; accepted: the model's own tokenizer (at most as many "
                         "tokens as embedding rows)")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Keep transformers' multi-line LOAD REPORT warning off stderr (:func:`check_loading_info` says it in one
    line); every other message of transformers is left alone."""
    log = logging.getLogger("transformers.modeling_utils")
    f = _DropLoadReport()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)
