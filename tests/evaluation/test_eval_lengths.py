"""``bupo eval``'s default --max-new-tokens: the model folder's generation_config, else the length the model was
trained at (bupo_run.json), else its shipped preset's (OctoThinker 3072, Qwen3 8192), else 8192."""

from __future__ import annotations

import json

from bupo.evaluation.cli import DEFAULT_MAX_NEW_TOKENS, _default_max_new_tokens
from bupo.recipes.lengths import preset_length, trained_length


def test_preset_lengths() -> None:
    assert preset_length("OctoThinker/OctoThinker-3B-Long-Base") == 3072
    assert preset_length("OctoThinker/OctoThinker-8B-Long-Base") == 3072
    assert preset_length("Qwen/Qwen3-4B") == 8192
    assert preset_length("someone/else") is None and preset_length(None) is None


def test_default_order(tmp_path) -> None:
    assert _default_max_new_tokens(tmp_path) == DEFAULT_MAX_NEW_TOKENS == 8192
    assert _default_max_new_tokens(tmp_path, "OctoThinker/OctoThinker-3B-Long-Base") == 3072
    (tmp_path / "bupo_run.json").write_text(json.dumps({"max_completion_length": 64}))
    assert trained_length(tmp_path) == 64
    assert _default_max_new_tokens(tmp_path, "OctoThinker/OctoThinker-3B-Long-Base") == 64
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 12}))
    assert _default_max_new_tokens(tmp_path) == 12
    (tmp_path / "bupo_run.json").write_text(json.dumps({"max_completion_length": "64"}))
    assert trained_length(tmp_path) is None
