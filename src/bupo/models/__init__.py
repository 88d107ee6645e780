"""Models: the names bupo knows, GGUF import, and the one resolver and loader behind every ``--model``.

- :mod:`bupo.models.registry`: model names (:data:`MODELS`), the bundled model's folder, the cache of converted
  models (:func:`prepare_model`, :func:`cache_root`);
- :mod:`bupo.models.gguf`: :func:`import_gguf`, any GGUF as a checked Hugging Face safetensors folder;
- :mod:`bupo.models.load`: :func:`resolve_model` (spec -> folder), :func:`load_model` (spec -> ``(model,
  tokenizer)``), :func:`load_tokenizer`, :func:`resolve_device`.

Nothing here imports :mod:`bupo.zoo` (the zoo builds on this layer). Only the standard library is imported at top
level; torch and transformers are imported when a model is loaded or converted.
"""

from __future__ import annotations

from bupo.models.gguf import import_gguf
from bupo.models.load import load_model, load_tokenizer, resolve_device, resolve_model, validate_model_folder
from bupo.models.registry import (
    BUNDLED_DIR,
    MARKER,
    MODELS,
    ModelEntry,
    bundled_model_path,
    cache_root,
    is_ready,
    model_table,
    prepare_model,
)

__all__ = [
    "BUNDLED_DIR",
    "MARKER",
    "MODELS",
    "ModelEntry",
    "bundled_model_path",
    "cache_root",
    "import_gguf",
    "is_ready",
    "load_model",
    "load_tokenizer",
    "model_table",
    "prepare_model",
    "resolve_device",
    "resolve_model",
    "validate_model_folder",
]
