"""The bundled tiny reasoning model (``tiny_reasoner/``) and its task; the default ``--model`` everywhere.

``tiny_reasoner`` is a Qwen3 (``Qwen3ForCausalLM``, 8 decoder layers, ~1.6M parameters, tied embeddings)
with its own character-level fast tokenizer and a Qwen3 chat template, trained by ``bupo model build``
(:mod:`bupo.zoo.recipe`) on the bundled arithmetic task (:mod:`bupo.data.task`). It loads offline with
``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)`` / ``AutoTokenizer.from_pretrained(DEFAULT_MODEL)``;
its model card (``README.md`` in that folder, ``bupo model info``) records the recipe and accuracy.

This module imports only the standard library at top level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DEFAULT_MODEL", "bundled_model_path", "bundled_task", "load_bundled", "model_card"]

if TYPE_CHECKING:
    from bupo.models.registry import bundled_model_path

    DEFAULT_MODEL: str


def __getattr__(name: str) -> Any:
    """``DEFAULT_MODEL`` (the bundled folder as a plain str, usable as an argparse default) and
    ``bundled_model_path`` come from the model registry, which knows the folder's place; they are looked up on
    first use so that ``bupo --help``, which imports this package, does not load the model layer."""
    if name not in ("DEFAULT_MODEL", "bundled_model_path"):
        raise AttributeError(f"module 'bupo.zoo' has no attribute {name!r}")
    from bupo.models import registry

    value = str(registry.BUNDLED_DIR) if name == "DEFAULT_MODEL" else registry.bundled_model_path
    globals()[name] = value  # later lookups skip __getattr__
    return value


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
    from bupo.models import bundled_model_path

    return (bundled_model_path() / "README.md").read_text(encoding="utf-8")
