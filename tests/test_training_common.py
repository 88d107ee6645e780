"""Shared fixtures for the training tests (tiny offline models, a char-level tokenizer) + the data-side tests."""

from __future__ import annotations

import torch

from tiny_models import tiny_model

SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 = tiny_models' pad/bos/eos
CHARS = ["\n", *(chr(c) for c in range(32, 127))]
VOCAB = len(SPECIALS) + len(CHARS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (WordLevel over single characters), left padding, a plain chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(layers: int = 4, tie: bool = False, seed: int = 0, **kw):
    m = tiny_model("qwen3", tie=tie, layers=layers, seed=seed, vocab_size=VOCAB, **kw)
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    return m.train()


def letter_reward(completions, **kwargs):
    """Toy reward: the fraction of characters before 'A' in ASCII (about 1/3 for random text; continuous, so
    groups almost always have non-zero advantages and every update has a gradient)."""
    return [sum(ch < "A" for ch in c) / max(1, len(c)) for c in completions]


def make_dataset(n: int = 16):
    from datasets import Dataset

    prompts = [f"user: count {i} a's\nassistant: " for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "ground_truth": [str(i) for i in range(n)]})


def make_config(tmp_path, **kw):
    from bupo.training.config import BuPOConfig

    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=1e-2,
        max_steps=4, logging_steps=1, save_strategy="no", seed=0, internal_layer=1, internal_steps=2,
        temperature=1.0, probe_every=1, probe_size=2, disable_tqdm=True,
    )
    base.update(kw)
    return BuPOConfig(**base)


def make_trainer(tmp_path, model=None, reward=letter_reward, dataset=None, trainer_cls=None, trainer_kw=None, **kw):
    from bupo.training.trainer import BuPOTrainer

    torch.manual_seed(0)
    cls = trainer_cls or BuPOTrainer
    return cls(model=model if model is not None else make_model(), reward_funcs=reward,
               args=make_config(tmp_path, **kw), train_dataset=dataset if dataset is not None else make_dataset(),
               processing_class=char_tokenizer(), **(trainer_kw or {}))


# ---------------------------------------------------------------------------------------------------------------
# data-side tests (rows -> the trainer's dataset)


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
