"""The bundled tiny reasoning model: offline loading, tokenizer + chat template, generation + reward,
the recipe's smoke run (deterministic), the accuracy band, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bupo.zoo import DEFAULT_MODEL, bundled_model_path, bundled_task, load_bundled

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Compute (12 + 5) * 3."}]


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


def test_folder_contents_small_and_pickle_free():
    folder = bundled_model_path()
    assert str(folder) == DEFAULT_MODEL
    names = {p.name for p in folder.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "README.md", "recipe.json"):  # fmt: skip
        assert required in names, required
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024


def test_loads_offline_in_a_fresh_process_and_generates(tmp_path):
    # a fresh interpreter with the hub switched off: nothing may be fetched, everything comes from the folder
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bupo.rewards import extract_boxed
p = {DEFAULT_MODEL!r}
tok = AutoTokenizer.from_pretrained(p)
model = AutoModelForCausalLM.from_pretrained(p)
msgs = {MSGS!r}
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
enc = tok(text, return_tensors="pt", add_special_tokens=False)
torch.manual_seed(0)
out = model.generate(**enc, do_sample=False, max_new_tokens=64)
gen = out[0, enc["input_ids"].shape[1]:].tolist()
print(json.dumps({{"type": model.config.model_type, "layers": model.config.num_hidden_layers,
    "params": sum(p.numel() for p in model.parameters()), "fast": tok.is_fast,
    "completion": tok.decode(gen, skip_special_tokens=True), "last": gen[-1], "eos": tok.eos_token_id,
    "boxed": extract_boxed(tok.decode(gen, skip_special_tokens=True))}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["type"] == "qwen3"
    assert info["layers"] >= 8
    assert 1_000_000 <= info["params"] <= 5_000_000
    assert info["fast"]
    # greedy generation stops at <|im_end|> and the reward's parser finds the boxed answer (17 * 3 = 51)
    assert info["last"] == info["eos"]
    assert info["boxed"] is not None and info["boxed"].isdigit(), info["completion"]


def test_chat_template_matches_qwen3(bundled):
    _, tok = bundled
    base = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nCompute (12 + 5) * 3.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True) == base
    no_think = tok.apply_chat_template(
        MSGS, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == base + "<think>\n\n</think>\n\n"
    # a final assistant turn gets the (empty) think block, as in Qwen3's template
    full = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "x"}], tokenize=False)
    assert full == base + "<think>\n\n</think>\n\nx<|im_end|>\n"
    # multi-turn: only assistant turns after the last user turn keep their reasoning (Qwen3 behaviour)
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"},
    ]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n"
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # special tokens are single tokens; text round-trips exactly
    ids = tok(no_think, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == no_think
    assert "Please" in tok.convert_ids_to_tokens(ids)


def test_shared_generation_and_reward_on_bundled_task(bundled):
    from bupo.data.templates import render_prompt
    from bupo.generation import generate
    from bupo.rewards import boxed_exact, extract_boxed

    model, tok = bundled
    rows = bundled_task("test", 8, seed=0)
    prompts = [render_prompt(tok, r["prompt"], "qwen3_no_thinking") for r in rows]
    outs = generate(model, tok, prompts, n=2, max_new_tokens=96, temperature=1.0, seed=0, batch_size=16)
    texts = [c.text for cs in outs for c in cs]
    assert all(c.finish_reason == "stop" for cs in outs for c in cs)
    parsed = [extract_boxed(t) for t in texts]
    assert sum(p is not None and p.isdigit() for p in parsed) >= 14  # the format is learned
    greedy = generate(model, tok, prompts, n=1, max_new_tokens=96, temperature=0.0, seed=0, batch_size=16)
    scores = [
        boxed_exact(cs[0].text, r["reward_model"]["ground_truth"]) for cs, r in zip(greedy, rows, strict=True)
    ]
    assert sum(scores) >= 1  # it solves some of them


def test_heldout_pass_at_1_in_band(bundled):
    """pass@1 at T=1.0 on a fixed seeded held-out sample lies in the card's 20-60% band, pass@4 well above."""
    from bupo.zoo.recipe import evaluate

    model, tok = bundled
    rows = bundled_task("test", 48, seed=2024)
    res = evaluate(model, tok, rows, n_samples=4, seed=7, max_new_tokens=96, temperature=1.0, ks=(1, 4))
    assert 0.20 <= res["pass@1"] <= 0.60, res
    assert res["pass@4"] >= 1.3 * res["pass@1"], res


def test_recipe_evaluator_draws_what_generation_draws(bundled):
    """The recipe's evaluator (bupo.evaluation's stages) seeds sample j of problem i with sample_seed(seed, i, j),
    as bupo.generation.generate does: the numbers recorded in recipe.json and grpo_proof.json reproduce."""
    from bupo.data.templates import render_prompt
    from bupo.evaluation.metrics import mean_pass_at_k
    from bupo.generation import generate
    from bupo.rewards import boxed_exact
    from bupo.zoo.recipe import evaluate

    model, tok = bundled
    rows = bundled_task("test", 6, seed=11)
    res = evaluate(model, tok, rows, n_samples=3, seed=5, max_new_tokens=96, temperature=1.0, ks=(1, 3, 8))
    prompts = [render_prompt(tok, r["prompt"], "qwen3_no_thinking") for r in rows]
    outs = generate(model, tok, prompts, n=3, max_new_tokens=96, temperature=1.0, seed=5, batch_size=256)
    texts = [c.text for cs in outs for c in cs]
    counts = [int(sum(boxed_exact(c.text, r["reward_model"]["ground_truth"]) for c in cs))
              for cs, r in zip(outs, rows, strict=True)]  # fmt: skip
    assert res["example_completion"] == texts[0]
    assert res["mean_completion_chars"] == sum(len(t) for t in texts) / len(texts)
    assert {k: v for k, v in res.items() if k.startswith("pass@")} == {
        "pass@1": mean_pass_at_k(3, counts, 1), "pass@3": mean_pass_at_k(3, counts, 3)
    }  # Pass@8 needs 8 samples: left out
    assert (res["problems"], res["samples_per_problem"], res["temperature"]) == (6, 3, 1.0)


def test_card_records_recipe_and_accuracy():
    folder = bundled_model_path()
    card = (folder / "README.md").read_text()
    record = json.loads((folder / "recipe.json").read_text())
    proof = json.loads((folder / "grpo_proof.json").read_text())
    ev = record["eval_heldout_t1"]
    assert 0.20 <= ev["pass@1"] <= 0.60
    assert ev["pass@8"] >= 1.5 * ev["pass@1"]
    assert proof["after"]["pass@1"] - proof["before"]["pass@1"] >= 0.10
    assert proof["train_seconds"] <= 300
    for needle in (f"Seed {record['config']['seed']}", "imperfect demonstrations", "pass@1", "GRPO",
                   f"{100 * ev['pass@1']:.1f}%"):  # fmt: skip
        assert needle in card, needle


def test_bundled_task_accessor_matches_task_module():
    from bupo.data.task import make_examples

    assert bundled_task("train", 5, seed=9) == make_examples("train", 5, seed=9)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_recipe_smoke_run_is_deterministic(tmp_path):
    from bupo.zoo.recipe import RecipeConfig, build

    logs: list[str] = []
    rec1 = build(tmp_path / "a", RecipeConfig.smoke_config(seed=0), log=logs.append)
    rec2 = build(tmp_path / "b", RecipeConfig.smoke_config(seed=0), log=logs.append)
    rec3 = build(tmp_path / "c", RecipeConfig.smoke_config(seed=1), log=logs.append)
    a, b, c = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(tmp_path / "c")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert rec1["train"]["final_loss"] == rec2["train"]["final_loss"] != rec3["train"]["final_loss"]
    # the smoke output is a loadable model folder like the shipped one
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    t = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert m.config.model_type == "qwen3" and t.eos_token == "<|im_end|>"
    assert (tmp_path / "a" / "README.md").is_file()
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left nothing behind
    # an existing folder is never replaced unasked, and a folder the recipe did not build never at all
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out, flags, msg in ((mine, [], "holds files this build did not make"),
                            (mine, ["--overwrite"], "not a model folder built by the recipe"),
                            (tmp_path / "a", [], "holds an earlier build")):
        res = _cli("model", "build", "--smoke", "--out", str(out), *flags)
        assert res.returncode == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (mine / "notes.txt").read_text() == "keep me" and _state(tmp_path / "a").keys() == a.keys()
    rec4 = build(tmp_path / "a", RecipeConfig.smoke_config(seed=1), log=logs.append, overwrite=True)
    assert rec4["train"]["final_loss"] == rec3["train"]["final_loss"]  # an earlier build replaced when asked
    assert all(torch.equal(_state(tmp_path / "a")[k], c[k]) for k in c)


def test_noisy_demonstrations_slip_at_the_requested_rate():
    import random

    from bupo.data.task import make_examples
    from bupo.zoo.recipe import noisy_solution

    rng = random.Random(0)
    rows = make_examples("train", 400, seed=1)
    from bupo.data.task import generate_problems

    probs = generate_problems("train", 400, seed=1)
    steps = wrong_steps = 0
    for p, r in zip(probs, rows, strict=True):
        clean = r["extra_info"]["solution"]
        assert noisy_solution(p.steps(), 0.0, rng) == clean
        noisy = noisy_solution(p.steps(), 0.2, rng).split("\n")
        for line in noisy[:-1]:
            lhs, rhs = line.split(" = ")
            a, op, b = lhs.split(" ")
            true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            steps += 1
            wrong_steps += int(rhs) != true
            assert int(rhs) >= 0
        # the boxed answer is the chain's last value
        assert noisy[-1] == f"\\boxed{{{noisy[-2].split(' = ')[1]}}}"
    assert 0.15 < wrong_steps / steps < 0.25


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bupo.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_model_info_and_path():
    res = _cli("model", "info")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("---") and "tiny_reasoner" in res.stdout
    res = _cli("model", "path")
    assert res.returncode == 0 and res.stdout.strip() == DEFAULT_MODEL
    res = _cli("model", "build", "--threads", "0")
    assert res.returncode == 2 and "--threads must be >= 1" in res.stderr
