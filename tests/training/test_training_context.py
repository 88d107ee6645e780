"""Length against context: prompt + max new tokens above max_position_embeddings is an error in
generation / eval / layer_logits and a counted drop in training and analysis (the shared helpers in
bupo.generation), never a silent run past the model's positions."""

from __future__ import annotations

import json

import pytest
import torch

from bupo.generation import check_context, context_length, fits_context, generate
from support.chat import char_tokenizer, tiny_qwen3

pytestmark = [pytest.mark.xdist_group("training")]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_qwen3(tok)  # max_position_embeddings 256


def test_helpers(model):
    assert context_length(model) == 256 == context_length(model.config)
    assert fits_context(200, 56, 256) and not fits_context(200, 57, 256) and fits_context(10**6, 1, None)
    check_context([10, 200], 56, 256)
    with pytest.raises(ValueError, match=r"1 of 2 prompts .* 200 tokens \+ max_new_tokens 57 = 257 > "
                                         r"max_position_embeddings 256; lower max_new_tokens to at most 56"):
        check_context([10, 200], 57, 256)


def test_generation_and_eval_reject_prompts_that_do_not_fit(model, tok):
    from bupo.evaluation import evaluate

    prompt = "y" * 200  # 200 tokens with the char tokenizer (no special tokens added)
    n = len(tok(prompt)["input_ids"])
    generate(model, tok, [prompt], max_new_tokens=256 - n, temperature=0)  # exactly fills the context: fine
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        generate(model, tok, ["short", prompt], max_new_tokens=257 - n, temperature=0)
    rows = [{"prompt": [{"role": "user", "content": "y" * 190}], "reward_model": {"ground_truth": "1"}}]
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        evaluate(model, tok, {"t": rows}, n=1, max_new_tokens=100, template="chat")


def test_layer_logits_rejects_sequences_longer_than_the_context(model):
    from bupo.internal import layer_logits

    assert layer_logits(model, torch.ones(1, 256, dtype=torch.long), layer=0).shape[1] == 256
    with pytest.raises(ValueError, match="257 positions, more than the model's max_position_embeddings 256"):
        layer_logits(model, torch.ones(1, 257, dtype=torch.long), layer=0)


def test_analyze_counts_prompts_without_room_for_max_new_tokens(model, tok):
    from bupo.analysis.run import analyze

    rows = [{"prompt": [{"role": "user", "content": c}], "reward_model": {"ground_truth": "1"}}
            for c in ("1+1?", "z" * 200)]  # the second fits alone (< 256) but not with 80 new tokens
    res = analyze(model, tok, data=rows, max_new_tokens=80, figures=False)
    assert res.summary["skipped"].get("too_long") == 1 and res.summary["num_samples"] == 1


def test_prompt_length_limit():
    from bupo.training.data import prompt_length_limit

    assert prompt_length_limit(1024, 64, 512) == (448, "max_position_embeddings 512 - max_completion_length 64 "
                                                        "< max_prompt_length 1024")
    assert prompt_length_limit(100, 64, 512) == (100, "max_prompt_length")
    assert prompt_length_limit(None, 64, None) == (None, "max_prompt_length")
    assert prompt_length_limit(None, 64, 512)[0] == 448
    with pytest.raises(ValueError, match="max_completion_length 512 leaves no room"):
        prompt_length_limit(1024, 512, 512)


def test_train_drops_and_counts_prompts_over_the_context_from_a_datasets_folder(tmp_path, capsys):
    """--dataset_name (a local ``datasets`` folder, as TRL's scripts take it) + the context drop, in one short run."""
    import datasets

    from bupo.cli import main
    from bupo.data.datasets import load_bundled
    from bupo.zoo import bundled_model_path

    rows = load_bundled("train", n=24, seed=0)
    long = [dict(r, prompt=[{"role": "user", "content": "7 " * 300 + r["prompt"][-1]["content"]}]) for r in rows[:4]]
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[4:] + long)}).save_to_disk(str(folder))
    out = tmp_path / "run"
    common = ["--model", str(bundled_model_path()), "--algo", "grpo", "--out", str(out), "--eval-data", "none",
              "--max_steps", "1", "--steps_per_generation", "1", "--per_device_train_batch_size", "8",
              "--num_generations", "8", "--max_completion_length", "64", "--save_strategy", "no",
              "--probe_every", "0", "--dataset_name", str(folder)]
    assert main(["train", *common]) == 0  # default max_prompt_length 1024 > the bundled model's 512 positions
    s = json.loads((out / "bupo_run.json").read_text())
    assert s["data"] == str(folder) and s["train_rows"] == 20 and s["prompts_dropped"] == 4
    assert s["prompt_length_limit"] == 448 and "max_position_embeddings 512" in s["prompt_length_limit_reason"]
    # the template is recorded with the saved model: bupo eval --template auto picks it up
    assert json.loads((out / "tokenizer_config.json").read_text())["bupo_template"] == s["template"]
    capsys.readouterr()
    common[common.index(str(out))] = str(tmp_path / "fresh")  # the bad inputs below, not the finished run, refused
    assert main(["train", *common, "--max_completion_length", "512"]) == 2
    assert "leaves no room" in capsys.readouterr().err
    assert main(["train", *common[:-2], "--dataset_name", str(tmp_path / "missing")]) == 2
    assert "--dataset_name" in capsys.readouterr().err
