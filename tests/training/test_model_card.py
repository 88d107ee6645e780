"""The README.md a trained run writes (and push_to_hub uploads) says BuPO: base model, k, s_inter, evals, citation."""

from __future__ import annotations

import json

import pytest
import yaml

from bupo.cli import main
from support.training import char_tokenizer, make_model

pytestmark = pytest.mark.xdist_group("training")
TINY = ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--eval_samples", "2", "--eval_rows", "4", "--probe_every", "1", "--max_steps", "2", "--save_steps", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    make_model().save_pretrained(d / "base-model")
    char_tokenizer().save_pretrained(d / "base-model")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(12)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _card(path):
    text = path.read_text(encoding="utf-8")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def _run(ws, out, *extra):
    assert main(["train", "--model", str(ws / "base-model"), "--data", str(ws / "rows.jsonl"),
                 "--eval-data", str(ws / "rows.jsonl"), "--out", str(out), *TINY, *extra]) == 0
    return _card(out / "README.md")


def test_bupo_card_has_base_model_settings_evals_versions_and_citation(workspace, tmp_path):
    meta, body = _run(workspace, tmp_path / "bupo-run", "--internal-layer", "1", "--internal-steps", "1")
    assert "[None]" not in body and "None" not in body.split("## Framework")[0]
    assert "local folder `base-model`" in body and meta.get("base_model") is None  # a local folder: no Hub id
    assert "trained with **BuPO**" in body and "bupo" in meta["tags"] and meta["library_name"] == "transformers"
    assert "paper layer 2 (0-based k = 1)" in body and "| s_inter (internal phase) | 1 rollout steps" in body
    assert "`raw`" in body and "| prompt template | chat |" in body and "| reward | boxed_exact |" in body
    # the evaluation table: before training (step 0) and at the end, in %
    lines = body.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| rollout step | optimizer step |"))
    assert "rows/avg@2" in lines[head] and "rows/pass@1" in lines[head]
    rows = [line.strip("|").split("|") for line in lines[head + 2:] if line.startswith("|")]
    # 1 rollout step = 2 optimizer steps here (8 completions per optimizer step, 16 per rollout)
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("0", "0"), ("1", "2")], body
    assert all(0.0 <= float(c) <= 100.0 for r in rows for c in r[2:])
    assert "- trl: 1.16" in body and "- transformers: " in body and "- torch: " in body
    assert "arXiv:2512.19673" in body and "@software{vonwerra2020trl" in body
    # the checkpoint's card (written by TRL's _save_checkpoint) says BuPO too
    assert "trained with **BuPO**" in (tmp_path / "bupo-run" / "README.md").read_text()


def test_grpo_card_is_the_same_without_the_bupo_part(workspace, tmp_path):
    meta, body = _run(workspace, tmp_path / "grpo-run", "--algo", "grpo")
    assert "trained with **GRPO**" in body and "## BuPO settings" not in body and "bupo" not in meta["tags"]
    assert "## In-training evaluation" in body and "rows/avg@2" in body
    assert "2402.03300" in body and "2512.19673" not in body.split("## Citation")[1]


def test_hub_id_base_model_goes_into_the_metadata(workspace, tmp_path):
    from datasets import Dataset

    from bupo.rewards import make_reward_func
    from bupo.training.card import build_model_card
    from bupo.training.config import BuPOConfig
    from bupo.training.trainer import BuPOTrainer

    model = make_model()
    model.config._name_or_path = "Qwen/Qwen3-4B"
    args = BuPOConfig(output_dir=str(tmp_path / "o"), internal_layer=1, internal_steps=3, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, use_cpu=True, report_to="none")
    trainer = BuPOTrainer(model=model, reward_funcs=[make_reward_func("boxed_exact")], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4), processing_class=char_tokenizer())
    card = str(build_model_card(trainer))
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen3-4B" and "[Qwen/Qwen3-4B](https://huggingface.co/Qwen/Qwen3-4B)" in card
    assert "(not recorded)" in card  # template: only bupo train records it
    assert "No evaluation ran during training." in card
