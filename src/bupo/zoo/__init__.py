"""The bundled tiny reasoning model (``tiny_reasoner/``) and its task; the default ``--model`` everywhere.

``tiny_reasoner`` is a Qwen3 (``Qwen3ForCausalLM``, 8 decoder layers, ~1.6M parameters, tied embeddings)
with its own character-level fast tokenizer and a Qwen3 chat template, trained by ``bupo model build``
(:mod:`bupo.zoo.recipe`) on the bundled arithmetic task (:mod:`bupo.data.task`). It loads offline with
``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)`` / ``AutoTokenizer.from_pretrained(DEFAULT_MODEL)``;
its model card (``README.md`` in that folder, ``bupo model info``) records the recipe and accuracy.

This module imports only the standard library at top level.
"""

from __future__ import annotations

from typing import Any

from bupo.models.registry import BUNDLED_DIR, bundled_model_path

__all__ = ["DEFAULT_MODEL", "bundled_model_path", "bundled_task", "load_bundled", "model_card"]

# a plain str so it can serve directly as an argparse default; the folder's place is the model registry's
DEFAULT_MODEL: str = str(BUNDLED_DIR)


def load_bundled(dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled model, loaded offline, model in eval mode on CPU.

    ``dtype`` defaults to ``torch.float32``.
    """
    from bupo.models import load_model

    return load_model("tiny", dtype=dtype or "float32", device="cpu", local_files_only=True)


def bundled_task(
    split: str = "test", n: int = 200, seed: int = 0, difficulty: int | None = None
) -> list[dict]:
    """Rows of the bundled arithmetic task, validated (:func:`bupo.data.datasets.load_bundled`)."""
    from bupo.data.datasets import load_bundled as load_task

    return load_task(split, n, seed=seed, difficulty=difficulty)


def model_card() -> str:
    """The bundled model's card (its README.md)."""
    return (bundled_model_path() / "README.md").read_text(encoding="utf-8")
