"""Prompt templates against the paper's exact strings (paper.md §4.1), rendered with support.chat's char-level
tokenizer (a minimal, faithful copy of Qwen3's chat template)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bupo.data.datasets import data_path
from bupo.data.templates import OCTOTHINKER_TEMPLATE, TEMPLATES, render_prompt
from support.chat import char_tokenizer


def _first_row(name: str) -> dict:
    df = pd.read_parquet(data_path(name))
    return {"prompt": [dict(m) for m in df.iloc[0]["prompt"]]}


@pytest.mark.parametrize("name", ["aime24", "math500", "deepmath-5k"])
def test_qwen3_no_thinking_matches_the_paper(name: str) -> None:
    messages = _first_row(name)["prompt"]
    problem = messages[1]["content"]
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n" + problem + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_prompt(char_tokenizer(), messages, "qwen3_no_thinking") == expected


def test_chat_template_without_thinking_switch() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_prompt(char_tokenizer(), messages, "chat") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_octothinker_matches_the_paper() -> None:
    messages = _first_row("aime24")["prompt"]
    problem = messages[1]["content"]
    expected = (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. User: You must put your answer inside \\boxed{} and Your final answer will be extracted "
        "automatically by the \\boxed{} tag.\n" + problem + " Assistant:"
    )
    assert render_prompt(None, messages, "octothinker") == expected
    assert OCTOTHINKER_TEMPLATE.count("{problem}") == 1
    # braces in the problem survive (no str.format)
    assert render_prompt(None, [{"role": "user", "content": "x^{2} {problem}"}], "octothinker").endswith(
        "x^{2} {problem} Assistant:"
    )


def test_template_errors() -> None:
    msgs = [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="accepted: qwen3_no_thinking, chat, octothinker"):
        render_prompt(char_tokenizer(), msgs, "qwen")
    with pytest.raises(ValueError, match="has none"):
        render_prompt(char_tokenizer(chat_template=None), msgs, "chat")
    with pytest.raises(ValueError, match="has none"):
        render_prompt(None, msgs, "qwen3_no_thinking")
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    with pytest.raises(ValueError, match="enable_thinking"):
        render_prompt(char_tokenizer(chat_template=plain), msgs, "qwen3_no_thinking")
    with pytest.raises(ValueError, match="no user message"):
        render_prompt(None, [{"role": "system", "content": "S"}], "octothinker")
    with pytest.raises(ValueError, match="non-empty list"):
        render_prompt(None, [], "octothinker")
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        render_prompt(None, [{"role": "user"}], "octothinker")
    assert TEMPLATES == ("qwen3_no_thinking", "chat", "octothinker")


def test_bundled_tokenizer_renders_the_paper_prompt() -> None:
    from bupo.zoo import DEFAULT_MODEL

    assert (Path(DEFAULT_MODEL) / "config.json").exists(), "the bundled model ships with the package"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    messages = [
        {
            "role": "system",
            "content": "Please reason step by step, and put your final answer within \\boxed{}.",
        },
        {"role": "user", "content": "Compute 2 + 3."},
    ]
    assert render_prompt(tok, messages, "qwen3_no_thinking") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
