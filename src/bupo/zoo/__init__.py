"""The bundled tiny reasoning model (``tiny_reasoner/``) and its task; the default ``--model`` everywhere.

``tiny_reasoner`` is a Qwen3 (``Qwen3ForCausalLM``, 8 decoder layers, ~1.6M parameters, tied embeddings)
with its own character-level fast tokenizer and a Qwen3 chat template, trained by ``bupo model build``
(:mod:`bupo.zoo.recipe`) on the bundled arithmetic task (:mod:`bupo.data.task`). It loads offline with
``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)`` / ``AutoTokenizer.from_pretrained(DEFAULT_MODEL)``;
its model card (``README.md`` in that folder, ``bupo model info``) records the recipe and accuracy.

This module imports only the standard library at top level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "bundled_model_path", "bundled_task", "load_bundled", "model_card"]

_BUNDLED_DIR = Path(__file__).resolve().parent / "tiny_reasoner"
# a plain str so it can serve directly as an argparse default
DEFAULT_MODEL: str = str(_BUNDLED_DIR)


def bundled_model_path() -> Path:
    """The folder of the shipped model (config.json, model.safetensors, tokenizer files, README.md)."""
    if not (_BUNDLED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {_BUNDLED_DIR}; rebuild it with `bupo model build --out {_BUNDLED_DIR}`"
        )
    return _BUNDLED_DIR


def load_bundled(dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled model, loaded offline, model in eval mode on CPU.

    ``dtype`` defaults to ``torch.float32``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def bundled_task(
    split: str = "test", n: int = 200, seed: int = 0, difficulty: int | None = None
) -> list[dict]:
    """Rows of the bundled arithmetic task, validated (:func:`bupo.data.datasets.load_bundled`)."""
    from bupo.data.datasets import load_bundled as load_task

    return load_task(split, n, seed=seed, difficulty=difficulty)


def model_card() -> str:
    """The bundled model's card (its README.md)."""
    return (bundled_model_path() / "README.md").read_text(encoding="utf-8")
