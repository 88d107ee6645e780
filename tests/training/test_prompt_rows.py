"""Rows -> the trainer's prompt dataset: the paper's parquet rows rendered, overlong prompts dropped, bad
templates refused, a template's BOS not doubled."""

from __future__ import annotations

from support.training import CHAT_TEMPLATE, char_tokenizer


def test_paper_parquet_rows_become_rendered_prompts():
    from bupo.data.datasets import load_rows
    from bupo.data.templates import OCTOTHINKER_TEMPLATE
    from bupo.training.data import build_prompt_dataset

    rows = load_rows("aime24")  # the paper's set, packaged
    ds = build_prompt_dataset(rows, None, "octothinker")
    assert len(ds) == 30 and ds.column_names == ["prompt", "ground_truth", "data_source"]
    head = OCTOTHINKER_TEMPLATE.split("{problem}")[0]
    for row, ex in zip(rows, ds, strict=True):
        assert ex["prompt"].startswith(head) and row["prompt"][-1]["content"] in ex["prompt"]
        assert ex["prompt"].endswith(" Assistant:")
        assert ex["ground_truth"] == row["reward_model"]["ground_truth"]
    assert ds[0]["ground_truth"] == "540"  # paper.md: the first AIME 2024 row


def test_overlong_prompts_are_dropped_and_bad_templates_rejected():
    import pytest

    from bupo.training.data import build_prompt_dataset

    tok = char_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "x" * n}], "reward_model": {"ground_truth": "1"}}
            for n in (5, 50, 500)]
    ds = build_prompt_dataset(rows, tok, "chat", max_prompt_length=100)
    assert len(ds) == 2 and all(len(tok(p)["input_ids"]) <= 100 for p in ds["prompt"])
    with pytest.raises(ValueError, match="max_prompt_length"):
        build_prompt_dataset(rows, tok, "chat", max_prompt_length=3)
    with pytest.raises(ValueError, match="template"):
        build_prompt_dataset(rows, tok, "nope")
    with pytest.raises(ValueError, match="prompt"):
        build_prompt_dataset([{"prompt": "not messages", "reward_model": {"ground_truth": "1"}}], tok, "chat")


def test_a_template_bos_is_not_doubled_by_the_tokenizer():
    from tokenizers import processors

    from bupo.training.data import build_prompt_dataset

    tok = char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.chat_template = "<bos>" + CHAT_TEMPLATE
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "reward_model": {"ground_truth": "1"}}]
    text = build_prompt_dataset(rows, tok, "chat")["prompt"][0]
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and text.startswith("user: hi")
