"""The response length a model was trained at, for ``bupo eval``'s default ``--max-new-tokens``: the
``max_completion_length`` in a trained model's ``bupo_run.json``, else that of the shipped preset whose
``model_name_or_path`` is the model (OctoThinker presets train at 3072 tokens, the Qwen3 ones at 8192)."""

from __future__ import annotations

import json
from pathlib import Path

from bupo.recipes import RECIPES_DIR


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def trained_length(model_folder: str | Path) -> int | None:
    """``max_completion_length`` recorded in ``model_folder/bupo_run.json`` (None: no such file or value)."""
    try:
        return _positive_int(json.loads((Path(model_folder) / "bupo_run.json").read_text()).get("max_completion_length"))
    except (OSError, ValueError, AttributeError):
        return None


def preset_length(model: str | None) -> int | None:
    """The evaluation length (``eval_max_new_tokens``, else ``max_completion_length``) of the shipped preset whose
    ``model_name_or_path`` is ``model`` (a Hub id as the presets name it), or None."""
    if not model:
        return None
    import yaml

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if cfg.get("model_name_or_path") == model:
            return _positive_int(cfg.get("eval_max_new_tokens")) or _positive_int(cfg.get("max_completion_length"))
    return None
