"""bupo analyze on tiny models: numbers against an independent dense re-implementation of the official script,
the position convention, batching, resuming, bad input, the CLI end to end (analyze, compare, sample)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bupo.analysis import analyze, suggested_layer
from bupo.analysis import measure as measure_mod
from bupo.analysis import traces as traces_mod
from support.analysis import TRACES, char_tokenizer, make_model

# ---------------------------------------------------------------------------------------------------------------
# fixtures: a char-level tokenizer with a chat template, tiny models


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


# ---------------------------------------------------------------------------------------------------------------
# the independent dense reference: the official script's computation (fp32 hooks, full logits, softmax/log_softmax)


def official_reference(model, tok, traces, convention="bupo"):
    """Re-implementation of BuPO visualization/plot_internal_entropy.py's statistics on our positions.

    Hooks on layer.self_attn (output = A^l), on the decoder layer (input -> input_layernorm(input) as attention
    input; raw input / output for the layer I/O) and on layer.mlp (input = post_attention_layernorm(h_mid),
    output = F^l); every state through lm_head -> softmax / log_softmax -> entropy. Returns per-token dicts.
    """
    layers = model.model.layers
    store = {}
    hooks = []

    def grab_in(name):
        def fn(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            store[name] = h.detach().clone()
        return fn

    def grab_out(name):
        def fn(mod, args, out):
            store[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(grab_in(f"layer_{i}_in"), with_kwargs=True))
        hooks.append(layer.register_forward_hook(grab_out(f"layer_{i}_out")))
        hooks.append(layer.self_attn.register_forward_hook(grab_out(f"attn_{i}_out")))
        hooks.append(layer.mlp.register_forward_pre_hook(grab_in(f"mlp_{i}_in"), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(grab_out(f"mlp_{i}_out")))

    def ent(h):
        logits = model.lm_head(h).double()
        p = torch.softmax(logits, -1)
        logp = torch.log_softmax(logits, -1)
        return -(p * logp).sum(-1), logp

    rows = []
    try:
        for tr in traces:
            P = tr["prompt_ids"]
            R = tr["response_ids"]
            ids = torch.tensor([P + R])
            with torch.no_grad():
                logits = model(ids).logits[0].double()
                sl = slice(len(P) - 1, len(P) + len(R) - 1)
                nxt = ids[0, len(P): len(P) + len(R)]
                row = {}
                for i, layer in enumerate(layers):
                    h_in, h_out = store[f"layer_{i}_in"][0, sl], store[f"layer_{i}_out"][0, sl]
                    a, f = store[f"attn_{i}_out"][0, sl], store[f"mlp_{i}_out"][0, sl]
                    mlp_in = store[f"mlp_{i}_in"][0, sl]
                    row[f"in{i}"] = ent(h_in)[0]
                    out_e, out_lp = ent(h_out)
                    row[f"out{i}"] = out_e
                    row[f"lp{i}"] = out_lp.gather(-1, nxt[:, None])[:, 0]
                    row[f"attn{i}"] = ent(a)[0]
                    row[f"attn_in{i}"] = ent(layer.input_layernorm(store[f"layer_{i}_in"])[0, sl])[0]
                    row[f"mlp{i}"] = ent(f)[0]
                    row[f"mlp_in{i}"] = ent(mlp_in)[0]
                    row[f"mid{i}"] = ent(store[f"layer_{i}_in"][0, sl] + a)[0]
                lp = torch.log_softmax(logits[sl], -1)
                row["final"] = -(lp.exp() * lp).sum(-1)
                row["final_lp"] = lp.gather(-1, nxt[:, None])[:, 0]
                rows.append(row)
    finally:
        for h in hooks:
            h.remove()
    cat = {k: torch.cat([r[k] for r in rows]).numpy() for k in rows[0]}
    L = len(layers)
    ref = {
        "layer_entropy": [cat[f"out{i}"].mean() for i in range(L)],
        "attn_entropy": [cat[f"attn{i}"].mean() for i in range(L)],
        "ffn_entropy": [cat[f"mlp{i}"].mean() for i in range(L)],
        "layer_entropy_change": [(cat[f"out{i}"] - cat[f"in{i}"]).mean() for i in range(L)],
        "layer_logprob": [cat[f"lp{i}"].mean() for i in range(L)],
        "final_entropy": cat["final"].mean(),
        "final_logprob": cat["final_lp"].mean(),
        "embed_entropy": cat["in0"].mean(),
    }
    if convention == "bupo":
        ref["attn_entropy_change"] = [(cat[f"attn{i}"] - cat[f"attn_in{i}"]).mean() for i in range(L)]
        ref["ffn_entropy_change"] = [(cat[f"mlp{i}"] - cat[f"mlp_in{i}"]).mean() for i in range(L)]
    else:
        ref["attn_entropy_change"] = [(cat[f"mid{i}"] - cat[f"in{i}"]).mean() for i in range(L)]
        ref["ffn_entropy_change"] = [(cat[f"out{i}"] - cat[f"mid{i}"]).mean() for i in range(L)]
    return ref, cat


def _tokenized(tok, traces, template="chat"):
    return [{"prompt_ids": t.prompt_ids, "response_ids": t.response_ids}
            for t in traces_mod.tokenize_traces(tok, traces, template)]


def _assert_matches(summary, ref, atol=1e-4):
    for key, val in ref.items():
        got = summary[key]
        if isinstance(val, list):
            assert np.allclose(got, val, atol=atol, rtol=0), (key, got, val)
        else:
            assert got == pytest.approx(float(val), abs=atol), key


@pytest.mark.parametrize("convention", ["bupo", "residual"])
def test_summary_matches_the_official_script_computation(model, tok, convention):
    res = analyze(model, tok, traces=TRACES, delta=convention, figures=False, chunk_size=7, batch_tokens=64)
    ref, cat = official_reference(model, tok, _tokenized(tok, TRACES), convention)
    _assert_matches(res.summary, ref)
    assert res.summary["delta_convention"] == convention and res.summary["projection"] == "raw"
    # per-token columns too (kept in memory as float16 by default: compare at fp16 resolution)
    assert np.allclose(res.entropy("attn_out", 1), cat["attn1"], atol=1e-2)
    assert np.allclose(res.entropy("resid_pre", 0), cat["in0"], atol=1e-2)
    assert res.summary["num_tokens"] == sum(len(t["response_ids"]) for t in _tokenized(tok, TRACES))


def test_summary_records_how_the_logits_were_reduced_and_epilogues_agree(model, tok):
    a = analyze(model, tok, traces=TRACES, figures=False)
    assert (a.summary["chunk_size"], a.summary["gemm"], a.summary["epilogue"]) == (1024, "fp32", "eager")
    b = analyze(model, tok, traces=TRACES, figures=False, epilogue="compiled", chunk_size=3)
    assert (b.summary["chunk_size"], b.summary["epilogue"]) == (3, "compiled")
    for key in ("layer_entropy", "attn_entropy_change", "ffn_entropy_change"):
        assert np.allclose(a.summary[key], b.summary[key], atol=1e-5, rtol=0), key
    with pytest.raises(ValueError, match="accepted: auto, eager, compiled, triton"):
        analyze(model, tok, traces=TRACES, figures=False, epilogue="fused")


def test_matches_reference_on_an_untied_llama_with_several_samples_per_batch(tok):
    m = make_model("llama", layers=4, tie=False, seed=3)
    res = analyze(m, tok, traces=TRACES * 2, figures=False, token_dtype="float32", batch_tokens=10_000)
    ref, cat = official_reference(m, tok, _tokenized(tok, TRACES * 2))
    _assert_matches(res.summary, ref)
    assert np.allclose(res.entropy("mlp_in", 2), cat["mlp_in2"], atol=1e-5)
    # batching must not change anything: one sample per forward gives the same numbers
    res1 = analyze(m, tok, traces=TRACES * 2, figures=False, token_dtype="float32", batch_tokens=1)
    assert np.allclose(res1.tokens.drop(columns=[]).to_numpy(np.float64), res.tokens.to_numpy(np.float64), atol=2e-5)


def test_positions_token_ids_and_final_norm_self_check(model, tok):
    res = analyze(model, tok, traces=TRACES, projection="final_norm", figures=False, token_dtype="float32")
    t = res.tokens
    toks = traces_mod.tokenize_traces(tok, TRACES)
    for i, tr in enumerate(toks):
        rows = t[t["sample"] == i]
        P, R = len(tr.prompt_ids), len(tr.response_ids)
        assert rows["position"].tolist() == list(range(P - 1, P + R - 1))
        assert rows["token_id"].tolist() == tr.response_ids
        assert rows["response_index"].tolist() == list(range(R))
    L = res.num_layers
    # final_norm on the last layer's output is the model's own policy
    assert np.allclose(t[f"H.resid_post.{L - 1}"], t["H.final"], atol=1e-5)
    assert np.allclose(t[f"logp.resid_post.{L - 1}"], t["logp.final"], atol=1e-5)
    assert res.summary["layer_top1_agreement"][-1] == 1.0
    m = res.layer_entropy_matrix(1)
    R1 = len(toks[1].response_ids)
    assert m.shape == (L, R1) and m.dtype == np.float32
    for k in range(L):
        assert np.array_equal(m[k], t.loc[t["sample"] == 1, f"H.resid_post.{k}"].to_numpy(np.float32))
    with pytest.raises(ValueError, match="no analysed tokens"):
        res.layer_entropy_matrix(99)
    # prompt and response tokenised separately: the response ids are exactly the response's own encoding
    assert toks[2].response_ids == tok(" 42", add_special_tokens=False)["input_ids"]


def test_outputs_written_atomically_and_suggested_layer(model, tok, tmp_path):
    out = tmp_path / "run"
    res = analyze(model, tok, traces=TRACES, out_dir=out)
    files = {p.name for p in out.iterdir()}
    assert {"summary.json", "tokens.parquet", "traces.jsonl", "report.html", "entropy_flow.png",
            "entropy_change.png", "layer_entropy.png", "heatmap.png"} <= files
    assert not [f for f in files if f.startswith(".")]  # no staging / tmp files left
    s = json.loads((out / "summary.json").read_text())
    for key in ("model", "projection", "delta_convention", "num_layers", "num_samples", "num_tokens", "layer_entropy",
                "attn_entropy", "ffn_entropy", "layer_entropy_change", "attn_entropy_change", "ffn_entropy_change",
                "layer_entropy_se", "attn_entropy_change_se", "ffn_entropy_change_se", "boundary_layer",
                "suggested_internal_layer", "final_entropy", "skipped", "vocab_size"):
        assert key in s, key
    L = s["num_layers"]
    assert all(len(s[k]) == L for k in ("layer_entropy", "ffn_entropy_change", "attn_entropy_change_se"))
    b = s["boundary_layer"]
    if b is None:
        with pytest.raises(ValueError, match="no internal layer"):
            suggested_layer(out)
    else:
        assert s["suggested_internal_layer"] == b - 1 == suggested_layer(out) == suggested_layer(out / "summary.json")
    # traces.jsonl carries the exact ids: re-analysing it reproduces the per-token numbers
    res2 = analyze(model, tok, traces=out / "traces.jsonl", out_dir=tmp_path / "again")
    assert res2.summary["num_tokens"] == res.summary["num_tokens"]
    assert np.allclose(res2.summary["layer_entropy"], res.summary["layer_entropy"], atol=1e-6)
    with pytest.raises(ValueError, match="already holds a finished analysis"):
        analyze(model, tok, traces=TRACES, out_dir=out)
    # parquet is compact: float16 entropy columns
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "tokens.parquet")
    assert str(schema.field("H.attn_out.0").type) == "halffloat"


def test_a_new_analysis_replaces_the_whole_output(model, tok, tmp_path):
    out = tmp_path / "w"
    analyze(model, tok, traces=TRACES, out_dir=out)
    assert (out / "report.html").is_file() and (out / "heatmap.png").is_file()
    res = analyze(model, tok, traces=TRACES[:2], out_dir=out, figures=False, overwrite=True)
    # the figures and report of the first analysis describe other numbers: they go with it
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "tokens.parquet", "traces.jsonl"]
    assert json.loads((out / "summary.json").read_text())["num_inputs"] == 2 and res.figures == {}
    assert len((out / "traces.jsonl").read_text().splitlines()) == 2


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(model, tok, tmp_path, monkeypatch):
    out = tmp_path / "r"
    traces = TRACES * 3
    real = measure_mod.measure_batch
    calls = []
    crash = [True]

    def flaky(model_, batch, **kw):
        calls.append([t.index for t in batch])
        if crash[0] and len(calls) == 3:
            crash[0] = False
            raise _Crash("simulated crash")
        return real(model_, batch, **kw)

    monkeypatch.setattr(measure_mod, "measure_batch", flaky)
    with pytest.raises(_Crash):
        analyze(model, tok, traces=traces, out_dir=out, batch_tokens=1)
    assert not (out / "summary.json").exists() and not (out / "tokens.parquet").exists()
    done = [i for c in calls[:2] for i in c]
    calls.clear()
    res = analyze(model, tok, traces=traces, out_dir=out, batch_tokens=1)
    assert not set(done) & {i for c in calls for i in c}  # finished samples were not measured again
    monkeypatch.setattr(measure_mod, "measure_batch", real)
    clean = analyze(model, tok, traces=traces, out_dir=tmp_path / "clean", figures=False)
    assert np.allclose(res.summary["ffn_entropy_change"], clean.summary["ffn_entropy_change"], atol=1e-7)
    assert res.summary["num_samples"] == len(traces)
    # the resumed tokens.parquet holds every row once, in sample order, as a clean run does
    key = ["sample", "position", "response_index", "token_id"]
    assert res.tokens[key].equals(clean.tokens[key])
    assert list(res.tokens.dtypes) == list(clean.tokens.dtypes)
    # an interrupted run followed by a run on *different* traces must not reuse the stale shards
    crash[0] = True
    calls.clear()
    monkeypatch.setattr(measure_mod, "measure_batch", flaky)
    with pytest.raises(_Crash):
        analyze(model, tok, traces=traces, out_dir=tmp_path / "s", batch_tokens=1)
    other = [dict(t, response=t["response"][::-1]) for t in traces]
    got = analyze(model, tok, traces=other, out_dir=tmp_path / "s", batch_tokens=1, figures=False)
    want = analyze(model, tok, traces=other, figures=False)
    assert np.allclose(got.summary["layer_entropy"], want.summary["layer_entropy"], atol=1e-7)


def test_bad_input_is_reported(model, tok, tmp_path):
    ctx = model.config.max_position_embeddings
    traces = TRACES + [{"prompt": "x", "response": ""}, {"prompt": "", "response": "abc"},
                       {"prompt": "y" * ctx, "response": "z"}]
    res = analyze(model, tok, traces=traces, figures=False)
    assert res.summary["skipped"] == {"empty_response": 1, "empty_prompt": 1, "too_long": 1}
    assert res.summary["num_samples"] == 3 and res.summary["num_inputs"] == 6
    with pytest.raises(ValueError, match="no analysable samples"):
        analyze(model, tok, traces=[{"prompt": "x", "response": ""}], figures=False)
    with pytest.raises(ValueError, match="unknown projection"):
        analyze(model, tok, traces=TRACES, projection="tuned", figures=False)
    with pytest.raises(ValueError, match="unknown delta convention"):
        analyze(model, tok, traces=TRACES, delta="resid", figures=False)
    with pytest.raises(ValueError, match="missing"):
        analyze(model, tok, traces=[{"prompt": "x", "text": "y"}], figures=False)
    with pytest.raises(ValueError, match="exactly one of"):
        analyze(model, tok, figures=False)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        analyze(model, tok, traces=TRACES, figures=False, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        analyze(model, tok, traces=TRACES, figures=False, top_p=1.5)
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\nnot json\n')
    with pytest.raises(ValueError, match="t.jsonl:2"):
        analyze(model, tok, traces=bad, figures=False)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no traces"):
        analyze(model, tok, traces=empty, figures=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        analyze(model, tok, traces=TRACES, out_dir=blocker / "sub")
    # generation: a prompt that already fills the context is not generated, and is counted
    long_rows = [{"prompt": [{"role": "user", "content": c}], "reward_model": {"ground_truth": "1"}}
                 for c in ("1+1?", "z" * ctx)]
    res = analyze(model, tok, data=long_rows, max_new_tokens=3, figures=False)
    assert res.summary["skipped"]["too_long"] == 1 and res.summary["num_samples"] == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "1+1", "reward_model": {"ground_truth": "2"}}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        analyze(model, tok, data=rows, figures=False)


def test_memory_does_not_hold_more_than_a_chunk_of_logits(model, tok, monkeypatch):
    # every logits tensor the analysis creates is at most chunk_size x vocab
    from bupo.internal import stats as stats_mod

    seen = []
    real = stats_mod.F.linear

    def spy(x, w, b=None):
        z = real(x, w, b)
        seen.append(tuple(z.shape))
        return z

    monkeypatch.setattr(stats_mod.F, "linear", spy)
    analyze(model, tok, traces=TRACES * 4, figures=False, chunk_size=5, batch_tokens=10_000)
    V = model.config.vocab_size
    lens = [s for s in seen if len(s) == 2 and s[-1] == V]  # the projections of the streams
    assert lens and max(s[0] for s in lens) <= 5
    # the model's own head runs on the last position only (logits_to_keep=1): never [B, T, V]
    assert all(s[1] == 1 for s in seen if len(s) == 3 and s[-1] == V)


# ---------------------------------------------------------------------------------------------------------------
# CLI end to end (tiny checkpoint saved to disk; generation through bupo.generation)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("ckpt")
    make_model(layers=3).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_analyze_generate_compare_and_sample(ckpt, tmp_path, capsys, monkeypatch):
    from bupo.cli import main

    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as f:
        for q in ("1+2", "3*4", "5-1"):
            f.write(json.dumps({"prompt": [{"role": "system", "content": "Reason."},
                                           {"role": "user", "content": f"Compute {q}."}],
                                "reward_model": {"ground_truth": "0"}}) + "\n")
    out = tmp_path / "a"
    assert main(["analyze", "--model", str(ckpt), "--data", str(rows), "--out", str(out), "--max-new-tokens", "12",
                 "--max-samples", "2", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_samples"] + sum(s["skipped"].values()) == 2
    assert s["generation"]["max_new_tokens"] == 12 and s["template"] == "chat" and s["dtype"] == "float32"
    tr = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert len(tr) == 2 and all(len(t["response_ids"]) <= 12 for t in tr)
    printed = capsys.readouterr().out
    assert "analysed 2 samples" in printed or "skipped" in printed

    # no --data: the bundled task's held-out split
    out0 = tmp_path / "default"
    assert main(["analyze", "--model", str(ckpt), "--out", str(out0), "--max-samples", "2", "--max-new-tokens", "4",
                 "--quiet"]) == 0
    first = json.loads((out0 / "traces.jsonl").read_text().splitlines()[0])
    assert "Compute" in first["prompt"] and first["messages"][0]["role"] == "system"

    out2 = tmp_path / "b"
    assert main(["analyze", "--model", str(ckpt), "--traces", str(out / "traces.jsonl"), "--out", str(out2),
                 "--delta", "residual", "--projection", "final_norm", "--quiet"]) == 0
    cmp_dir = tmp_path / "cmp"
    assert main(["analyze", "compare", str(out), str(out2), "--out", str(cmp_dir)]) == 0
    cmp = json.loads((cmp_dir / "compare.json").read_text())
    assert len(cmp["runs"]) == 2 and cmp["mixed_settings"]
    # bad input: one line, exit status 2
    assert main(["analyze", "--model", str(ckpt), "--traces", str(tmp_path / "nope.jsonl"), "--out",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "traces file not found" in err and "Traceback" not in err
    # no --out: runs/analysis/<model name>, shown in --help (docs/cli.md)
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--model", str(ckpt), "--data", str(rows), "--limit", "1", "--max-new-tokens", "4",
                 "--quiet"]) == 0
    assert (tmp_path / "runs" / "analysis" / ckpt.name / "summary.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", str(ckpt), "--traces", "x", "--out", "y", "--projection", "tuned"])
    assert e.value.code == 2

    capsys.readouterr()
    assert main(["sample", "--model", str(ckpt), "--layer", "0,final", "--prompt", "Compute 1+1.",
                 "--max-new-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["layer"] for g in got] == [0, None] and all(len(g["samples"]) == 1 for g in got)
    assert main(["sample", "--model", str(ckpt), "--layer", "7", "--prompt", "x"]) == 2


def test_sample_layer_draws_from_the_internal_policy(model, tok):
    # greedy decoding from layer k must follow the argmax of lm_head(H^k) token by token
    from bupo.analysis.sample import prompt_ids, sample_layer
    from bupo.internal import layer_logits

    k = 1
    text = sample_layer(model, tok, "Compute 2+2.", layer=k, temperature=0, max_new_tokens=6)[0]
    ids = prompt_ids(tok, "Compute 2+2.", "chat")
    new = tok(text, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([ids + new])
    logits = layer_logits(model, seq, layer=k)
    expect = logits[0, len(ids) - 1: len(ids) + len(new) - 1].argmax(-1).tolist()
    assert new == expect and len(new) == 6
    full = sample_layer(model, tok, "Compute 2+2.", layer=None, temperature=0, max_new_tokens=6)[0]
    assert isinstance(full, str)
    with pytest.raises(ValueError):
        sample_layer(model, tok, "x", layer=99)
    for bad, what in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(n=0), "n \\(samples"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ValueError, match=what):
            sample_layer(model, tok, "x", layer=0, **bad)


def test_log_v_ceiling_bounds_entropies(model, tok):
    res = analyze(model, tok, traces=TRACES, figures=False)
    logv = math.log(res.summary["vocab_size"])
    for key in ("layer_entropy", "attn_entropy", "ffn_entropy"):
        assert max(res.summary[key]) <= logv + 1e-5


def test_cli_end_to_end_on_the_bundled_model(tmp_path):
    from bupo.cli import main
    from bupo.generation import encode_prompt
    from bupo.zoo import bundled_model_path

    path = bundled_model_path()  # ships with the package: missing is a failure
    out = tmp_path / "bundled"
    # defaults: the bundled model and the bundled task's held-out split
    assert main(["analyze", "--out", str(out), "--max-samples", "3", "--max-new-tokens", "64", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == str(path) and s["num_samples"] >= 1 and s["num_layers"] >= 1
    b = s["boundary_layer"]
    assert b is None or (1 <= b <= s["num_layers"] and s["suggested_internal_layer"] == b - 1)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    # the numbers equal the official computation on the same weights and the generated ids
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    traces = [t for t in traces if not t["skipped"]]
    toks = [{"prompt_ids": encode_prompt(tok, t["prompt"]), "response_ids": t["response_ids"]} for t in traces]
    ref, _ = official_reference(model, tok, toks)
    _assert_matches(s, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_every_family_self_consistent(family, tok):
    # residual convention: ΔH_attn + ΔH_FFN = ΔH_layer token by token; final_norm on the last layer = the real policy
    from support.tiny_models import tiny_model as tm

    m = tm(family, layers=3, vocab_size=128, tie=family == "gemma2")
    res = analyze(m, tok, traces=TRACES, projection="final_norm", delta="residual", figures=False,
                  token_dtype="float32")
    s = res.summary
    assert np.allclose(np.add(s["attn_entropy_change"], s["ffn_entropy_change"]), s["layer_entropy_change"], atol=1e-6)
    assert s["layer_entropy"][-1] == pytest.approx(s["final_entropy"], abs=1e-5)
    assert s["layer_logprob"][-1] == pytest.approx(s["final_logprob"], abs=1e-5)


def test_bad_arguments_are_rejected_before_any_generation_or_measurement(model, tok, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(measure_mod, "measure_batch", boom)
    monkeypatch.setattr(traces_mod, "generate_traces", boom)
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}]}]
    with pytest.raises(ValueError, match="figures need an out_dir"):
        analyze(model, tok, data=rows, max_new_tokens=2)
    with pytest.raises(ValueError, match="figures need an out_dir"):
        analyze(model, tok, traces=TRACES)
    with pytest.raises(ValueError, match="heatmap_sample 7 is not analysed"):
        analyze(model, tok, traces=TRACES, figures=False, heatmap_sample=7)
    skipped = TRACES + [{"prompt": "x", "response": ""}]
    with pytest.raises(ValueError, match="heatmap_sample 3 is not analysed \\(empty_response\\)"):
        analyze(model, tok, traces=skipped, figures=False, heatmap_sample=3)
    with pytest.raises(ValueError, match="heatmap_sample must be"):
        analyze(model, tok, traces=TRACES, figures=False, heatmap_sample="0")


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_restored(tok, monkeypatch):
    m = make_model(seed=5)
    m.train()
    m.model.layers[0].eval()  # a mixed state (e.g. a frozen block) must come back exactly as it was
    before = {name: mod.training for name, mod in m.named_modules()}
    real = measure_mod.measure_batch
    seen = []

    def spy(model_, batch, **kw):
        seen.append(any(mod.training for mod in model_.modules()))
        return real(model_, batch, **kw)

    monkeypatch.setattr(measure_mod, "measure_batch", spy)
    analyze(m, tok, traces=TRACES, figures=False)
    assert seen and not any(seen)  # dropout off while measuring
    assert {name: mod.training for name, mod in m.named_modules()} == before
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}]}]
    analyze(m, tok, data=rows, max_new_tokens=2, figures=False)
    assert {name: mod.training for name, mod in m.named_modules()} == before

    def crash(*a, **k):
        raise _Crash("boom")

    monkeypatch.setattr(measure_mod, "measure_batch", crash)
    with pytest.raises(_Crash):
        analyze(m, tok, traces=TRACES, figures=False)
    assert {name: mod.training for name, mod in m.named_modules()} == before
