"""The template used for training is recorded in the saved model folder (tokenizer_config.json) and in
bupo_run.json, and ``--template auto`` (bupo eval, the in-training eval) uses it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from bupo.data.templates import RECORDED_TEMPLATE_KEY, record_template, recorded_template
from bupo.evaluation import resolve_template
from bupo.zoo import bundled_model_path

pytestmark = [pytest.mark.xdist_group("training")]


@pytest.mark.parametrize("template", ["chat", "octothinker", "qwen3_no_thinking"])
def test_recorded_template_survives_save_and_wins_over_auto_detection(tmp_path, template):
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    assert recorded_template(tok) is None
    assert resolve_template(tok, "auto") == "qwen3_no_thinking"  # what auto detects without a record
    record_template(tok, template)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())[RECORDED_TEMPLATE_KEY] == template
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert recorded_template(again) == template and resolve_template(again, "auto") == template
    assert resolve_template(again, "chat") == "chat"  # an explicit choice still wins
    with pytest.raises(ValueError, match="unknown template"):
        record_template(tok, "nope")


def test_octothinker_presets_render_like_the_released_code():
    """The released code: tokenizer.apply_chat_template([system, user], add_generation_prompt=True)."""
    import yaml

    from bupo.data.templates import render_prompt

    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    msgs = [{"role": "system", "content": "Please reason step by step."}, {"role": "user", "content": "1+1?"}]
    for preset in ("octothinker-3b", "octothinker-8b"):
        from bupo.recipes import recipe_path

        with open(recipe_path(preset)) as f:
            template = yaml.safe_load(f)["template"]
        got = render_prompt(tok, msgs, template)
        assert got == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert "Please reason step by step." in got  # the system message is kept
