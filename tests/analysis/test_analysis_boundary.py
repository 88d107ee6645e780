"""The boundary answer on constructed profiles (Qwen-like, Llama-like, degenerate, none), projection health,
the logit-lens table against an independent reference, and ``--internal-layer auto`` refusing early."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bupo.analysis.summary import (
    layer_collapsed,
    projection_health,
)
from support.analysis import TRACES, answer, char_tokenizer, healthy_stats, make_model

# ---------------------------------------------------------------------------------------------------------------
# constructed per-layer profiles (what Aggregator.result() gives), one per case


def smollm2_like_raw() -> dict:
    """SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF), raw projection, measured by bupo analyze over 4 MATH500
    responses of 128 tokens: entropy 1.44 -> 0.06 nats while the model's output has 1.85, top-1 agreement 0 up
    to layer 20, realised-token log-prob down to -293, residual RMS 1.9 -> 90 (a massive-activation jump at k=11)."""
    H = [1.443, 0.756, 0.7, 0.661, 0.537, 0.5, 0.493, 0.459, 0.419, 0.339, 0.286, 0.28, 0.273, 0.299, 0.308, 0.245,
         0.231, 0.224, 0.197, 0.202, 0.187, 0.155, 0.173, 0.101, 0.116, 0.087, 0.109, 0.068, 0.067, 0.063]
    agree = [0.0] * 14 + [0.003, 0.0, 0.0, 0.0, 0.003, 0.008, 0.02, 0.056, 0.107, 0.12, 0.094, 0.112, 0.15, 0.061,
                          0.028, 0.198]
    logp = [-29.2, -47.9, -61.0, -65.2, -72.5, -76.7, -79.8, -84.0, -91.9, -97.2, -97.0, -101.7, -105.4, -104.8,
            -105.1, -135.5, -136.2, -130.6, -127.4, -131.4, -118.1, -108.1, -105.0, -104.0, -133.5, -131.4, -129.4,
            -186.8, -293.4, -236.9]
    # residual RMS per layer over MATH500 prompt tokens (bupo.analysis.health.quick_health on the same model)
    rms = [2.0, 3.0, 4.0, 4.2, 4.5, 4.7, 4.9, 5.2, 5.8, 5.9, 6.1, 11.5, 11.7, 12.0, 12.2, 12.9, 13.4, 13.6, 14.0, 15.0,
           15.6, 17.3, 18.9, 21.1, 23.4, 25.3, 27.1, 30.7, 30.8, 35.2]
    return {"layer_entropy": H, "layer_top1_agreement": agree, "layer_logprob": logp, "final_entropy": 1.85,
            "resid_rms": rms}


def smollm2_like_final_norm() -> dict:
    """The same model and responses under final_norm (logit lens): readable, converging over the last layers."""
    H = [1.23, 1.31, 1.341, 1.381, 1.466, 1.469, 1.46, 1.281, 1.184, 1.124, 1.031, 1.036, 1.108, 1.083, 1.094, 0.995,
         0.999, 0.958, 0.882, 0.924, 0.843, 0.76, 0.742, 0.797, 1.219, 1.222, 1.171, 1.243, 1.62, 1.85]
    agree = [0.059, 0.046, 0.084, 0.048, 0.061, 0.069, 0.048, 0.056, 0.056, 0.076, 0.074, 0.107, 0.109, 0.104, 0.125,
             0.14, 0.153, 0.15, 0.168, 0.188, 0.226, 0.234, 0.28, 0.338, 0.372, 0.417, 0.499, 0.529, 0.552, 1.0]
    logp = [-15.8, -16.8, -16.9, -16.7, -16.4, -16.5, -16.7, -17.8, -18.5, -19.1, -19.8, -19.4, -18.8, -18.9, -18.0,
            -19.4, -19.2, -19.2, -18.6, -17.4, -15.6, -15.9, -14.0, -10.8, -7.6, -7.0, -5.9, -4.9, -4.0, -1.8]
    return {"layer_entropy": H, "layer_top1_agreement": agree, "layer_logprob": logp, "final_entropy": 1.85}


#: mean ΔH_FFN (bupo convention) of the same runs: raw negative everywhere; final_norm positive up to the last layer
SMOLLM2_FFN_RAW = [-9.271, -2.201, -2.412, -2.053, -3.632, -3.556, -4.079, -5.008, -6.996, -7.043, -7.266, -6.507,
                   -6.676, -6.36, -6.712, -7.383, -6.985, -7.1, -8.798, -8.968, -9.555, -9.557, -9.848, -9.981,
                   -10.133, -9.912, -10.174, -10.357, -10.274, -9.912]
SMOLLM2_FFN_FINAL_NORM = [1.474, 0.13, -0.265, -0.174, -0.32, -0.255, -0.039, -0.601, -0.687, -0.63, -0.579, 0.843,
                          1.231, 0.868, 0.733, 1.159, 0.935, 1.114, 1.31, 1.108, 0.813, 1.125, 1.137, 1.7, 1.243,
                          1.673, 1.139, 0.76, 0.857, 0.752]


def qwen_ffn(rng):
    """Qwen3-4B, paper Fig. 3: ΔH_FFN > 0 in layers 1-6, ≈0 in 7-26, < 0 in 27-36."""
    return np.r_[rng.uniform(1.0, 4.0, 6), rng.normal(0.0, 0.15, 20), rng.uniform(-9.0, -1.0, 10)]


def llama_ffn(rng, L=28):
    return np.r_[rng.uniform(0.02, 0.2, L - 1), [-3.0]]


@pytest.mark.parametrize("seed", range(5))
def test_qwen_profile_gives_the_papers_answer_layer_6_k_5(seed):
    rng = np.random.default_rng(seed)
    ffn = qwen_ffn(rng)
    rec = answer(ffn, healthy_stats(36, rng))
    assert rec["boundary_layer"] == 6 and rec["suggested_internal_layer"] == 5
    b = rec["boundary"]
    assert b["reason"] is None and b["options"] is None
    assert b["answer"] == {"boundary_layer": 6, "internal_layer": 5}
    # the rule and its inputs are recorded
    assert "C(b)" in b["rule"] and b["inputs"]["ffn_entropy_change"] == pytest.approx(list(ffn))
    assert b["inputs"]["projection"] == "raw" and b["inputs"]["projection_degenerate"] is False
    assert b["stages"][:6] == ["+"] * 6 and b["stages"][-10:] == ["-"] * 10


@pytest.mark.parametrize("seed", range(5))
def test_llama_profile_gives_the_penultimate_layer(seed):
    rng = np.random.default_rng(seed)
    rec = answer(llama_ffn(rng), healthy_stats(28, rng))
    assert rec["boundary_layer"] == 27 and rec["suggested_internal_layer"] == 26  # the paper's OctoThinker-3B k


def test_degenerate_projection_has_no_boundary_whatever_the_ffn_profile_says():
    stats = smollm2_like_raw()
    health = projection_health(stats, projection="raw", final_norm_weight={"rms": 1.81})
    assert health["degenerate"] and health["collapsed_layers"][0] == 1  # layer 0 (1.44 nats) is not collapsed
    assert 0.5 < health["collapsed_fraction"] < 1
    msg = health["message"]
    for number in ("1.85", "0.067", "0.756", "2 -> 35.2", "1.81", "-293.4"):  # the measured numbers are named
        assert number in msg, msg
    assert "final_norm" in health["advice"] and "Table 5" in health["advice"]
    # the same model under final_norm is readable
    assert not projection_health(smollm2_like_final_norm(), projection="final_norm")["degenerate"]
    # the raw answer: none, because the projection is degenerate (and ΔH_FFN < 0 everywhere besides)
    rec = answer(SMOLLM2_FFN_RAW, stats)
    assert rec["boundary_layer"] is None and rec["suggested_internal_layer"] is None
    b = rec["boundary"]
    assert "degenerate" in b["reason"] and b["note"] == b["reason"]
    assert any("--projection final_norm" in o for o in b["options"])
    # even a Qwen-shaped FFN profile gives no k when the projection is degenerate; the ΔH rule's own answer is kept
    rec = answer(qwen_ffn(np.random.default_rng(0))[:30], stats)
    assert rec["suggested_internal_layer"] is None and rec["boundary"]["ffn_rule_layer"] == 6
    # under final_norm a degenerate verdict does not advise final_norm again
    h2 = projection_health(stats, projection="final_norm")
    assert h2["degenerate"] and h2["advice"].startswith("no bupo projection")


def test_smollm2_final_norm_profile_has_no_convergence_stage():
    rec = answer(SMOLLM2_FFN_FINAL_NORM, smollm2_like_final_norm(), projection="final_norm")
    b = rec["boundary"]
    assert rec["suggested_internal_layer"] is None and b["ffn_rule_layer"] == 30
    assert "no convergence stage" in b["reason"]
    assert any(o.startswith("--internal-layer 28 ") for o in b["options"])


def test_no_boundary_cases_say_why_and_offer_options():
    rng = np.random.default_rng(1)
    stats = healthy_stats(30, rng)
    none = answer(-np.abs(rng.normal(1, 0.3, 30)), stats)  # SmolLM2 raw with the paper's ΔH: no layer > 0
    assert none["suggested_internal_layer"] is None and "no exploration stage" in none["boundary"]["reason"]
    assert none["boundary"]["ffn_rule_layer"] is None
    full = answer(rng.uniform(0.1, 1.0, 30), stats, projection="final_norm")  # SmolLM2 final_norm: positive to L
    b = full["boundary"]
    assert full["suggested_internal_layer"] is None and b["ffn_rule_layer"] == 30
    assert "no convergence stage" in b["reason"] and "GRPO" in b["reason"]
    assert any(o.startswith("--internal-layer 28 ") for o in b["options"])  # penultimate, stated as an option
    assert any("--algo grpo" in o for o in b["options"])


def test_collapse_needs_both_low_entropy_and_disagreement():
    # bottom layers of a healthy model: high entropy, top-1 rarely the final one -> not collapsed
    assert not layer_collapsed(9.0, 0.0, 2.0)
    # a confident layer that agrees with the output (near the top) -> not collapsed
    assert not layer_collapsed(0.05, 0.8, 2.0)
    assert layer_collapsed(0.05, 0.0, 2.0)
    rng = np.random.default_rng(0)
    assert not projection_health(healthy_stats(36, rng), projection="raw")["degenerate"]
    # a model whose own output is near one-hot does not make every layer 'collapsed'
    s = healthy_stats(8, rng)
    s.update(final_entropy=0.01)
    assert not projection_health(s, projection="raw")["degenerate"]


# ---------------------------------------------------------------------------------------------------------------
# on tiny models: a degenerate raw projection made on purpose, the lens table, bupo train's early refusal


def degenerate_model():
    """A raw projection made degenerate on purpose: a residual stream of RMS ~600 (30,000x the init), so lm_head(h)
    is near one-hot, and a final-norm gain that negates it, so the raw arg-max is never the model's (the simplest
    construction of what real checkpoints show with gains far from uniform)."""
    model = make_model(tie=False, layers=4)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30000.0)
        model.model.norm.weight.fill_(-2.0)
    return model


def test_quick_health_matches_layer_logits_and_flags_the_degenerate_model():
    from bupo.analysis.health import check_layer, quick_health
    from bupo.internal import layer_logits

    tok = char_tokenizer()
    prompts = ["What is 2 + 2? Think first.", "Name a colour."]
    healthy = make_model(tie=False, layers=4)
    h = quick_health(healthy, tok, prompts, projection="raw", positions_per_prompt=8)
    # independent reference: the mean entropy of layer_logits at the same positions
    ids = tok(prompts[0])["input_ids"]
    want = []
    for k in range(4):
        z = layer_logits(healthy, torch.tensor([ids]), layer=k, projection="raw")[0].float()
        lp = torch.log_softmax(z, -1)
        ent = -(lp.exp() * lp).sum(-1)
        want.append(ent)
    single = quick_health(healthy, tok, prompts[:1], projection="raw", positions_per_prompt=8)
    T = len(ids)
    for k in range(4):
        assert single["layer_entropy"][k] == pytest.approx(float(want[k][T - 9 : T - 1].detach().double().mean()), abs=1e-4)
    assert h["num_tokens"] == 16 and not h["degenerate"]

    bad = degenerate_model()
    raw = quick_health(bad, tok, prompts, projection="raw")
    lens = quick_health(bad, tok, prompts, projection="final_norm")
    assert raw["degenerate"] and max(raw["layer_entropy"][:-1]) < 0.25 * raw["final_entropy"]
    assert not lens["degenerate"]
    assert min(raw["resid_rms"]) > 10 * max(healthy_rms for healthy_rms in h["resid_rms"])
    warn = check_layer(raw, 1)
    assert warn and "k = 1" in warn and "final_norm" in warn and "residual RMS" in warn
    assert check_layer(lens, 1) is None


def test_auto_layer_refuses_a_degenerate_projection_before_any_analysis(tmp_path, monkeypatch):
    import bupo.analysis.run as analysis_run
    from bupo.training.run import resolve_internal_layer

    def no_analysis(*a, **kw):
        raise AssertionError("a long analysis must not run")

    monkeypatch.setattr(analysis_run, "analyze", no_analysis)
    rows = [{"prompt": [{"role": "user", "content": f"Compute {i} + {i}."}]} for i in range(4)]
    common = dict(model=degenerate_model(), tokenizer=char_tokenizer(), model_path=None, output_dir=str(tmp_path),
                  rows=rows, template="chat", samples=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="no usable boundary: the raw layer policies are degenerate") as e:
        resolve_internal_layer("auto", analysis=None, **common)
    assert "--projection final_norm" in str(e.value) and "--internal-layer K" in str(e.value)
    # a finished analysis without a usable boundary: its reason and options, at once (no new analysis)
    done = tmp_path / "given"
    done.mkdir()
    reason = "no usable boundary: mean ΔH_FFN stays positive to the last layer"
    (done / "summary.json").write_text(json.dumps({
        "num_layers": 4, "projection": "final_norm", "boundary_layer": None, "suggested_internal_layer": None,
        "boundary": {"note": reason, "reason": reason, "options": ["--internal-layer 2", "--algo grpo"]}}))
    with pytest.raises(ValueError, match="stays positive to the last layer. Options: --internal-layer 2; --algo grpo"):
        resolve_internal_layer("auto", analysis=str(done), projection="final_norm", **common)
    # the same analysis cached in <out>/analysis is found and read first, also with no --analysis
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "summary.json").write_text((done / "summary.json").read_text())
    with pytest.raises(ValueError, match="suggests no internal layer"):
        resolve_internal_layer("auto", analysis=None, projection="final_norm", **common)
    # an analysis of another projection describes another policy
    with pytest.raises(ValueError, match="made with projection 'final_norm'"):
        resolve_internal_layer("auto", analysis=str(done), projection="raw", **common)


def test_lens_table_matches_layer_logits_and_shows_both_projections():
    from bupo.analysis.lens import format_lens, lens_table
    from bupo.internal import layer_logits

    tok = char_tokenizer()
    model = make_model(tie=False, layers=3)
    ids = tok("Q: 7*6?\nA: 42")["input_ids"]
    table = lens_table(model, tok, ids, positions=[-1, 4], top=3)
    assert [b["position"] for b in table["positions"]] == [len(ids) - 1, 4]
    block = table["positions"][1]
    assert block["next_token"] == tok.decode([ids[5]])
    for k in range(3):
        for proj in ("raw", "final_norm"):
            z = layer_logits(model, torch.tensor([ids]), layer=k, projection=proj)[0, 4].detach().float()
            p = torch.softmax(z, -1)
            want = [tok.decode([i]) for i in p.topk(3).indices.tolist()]
            cell = block["layers"][k][proj]
            assert [t for t, _ in cell["top"]] == want
            assert cell["top"][0][1] == pytest.approx(float(p.max()), abs=1e-4)
            assert cell["entropy"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-3)
    text = format_lens(table)
    assert "raw: H" in text and "final_norm: H" in text and text.count("\n") >= 2 * (3 + 3)
    with pytest.raises(ValueError, match="out of range"):
        lens_table(model, tok, ids, positions=[len(ids)])


def test_analysis_records_health_rms_and_the_lens_table_in_the_report(tmp_path):
    from bupo.analysis import analyze

    tok = char_tokenizer()
    res = analyze(degenerate_model(), tok, traces=TRACES, out_dir=tmp_path / "a")
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(s["resid_rms"]) == 4 and min(s["resid_rms"]) > 100
    assert s["projection_health"]["degenerate"] and s["suggested_internal_layer"] is None
    assert "degenerate" in s["boundary"]["reason"]
    assert s["lens"]["sample"] == s["heatmap_sample"] and len(s["lens"]["positions"][0]["layers"]) == 4
    page = (tmp_path / "a" / "report.html").read_text()
    assert "Degenerate projection" in page and "Logit lens" in page and "top tokens final_norm" in page
    assert res.summary["final_norm_weight"]["rms"] > 0


def test_cli_lens_and_sample_with_either_projection(tmp_path, capsys):
    from bupo.analysis.lens import lens_table
    from bupo.analysis.sample import prompt_ids, sample_layer
    from bupo.cli import main

    tok = char_tokenizer()
    model = degenerate_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["lens", "--model", str(tmp_path / "m"), "--prompt", "Compute 1+1.", "--top", "2",
                 "--position=-1,-2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = lens_table(model, tok, prompt_ids(tok, "Compute 1+1.", "chat"), positions=[-1, -2], top=2)
    assert got["positions"] == want["positions"] and got["projections"] == ["raw", "final_norm"]
    assert main(["lens", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--projection", "raw"]) == 0
    text = capsys.readouterr().out
    assert "raw: H" in text and "final_norm: H" not in text
    assert main(["lens", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--position", "x"]) == 2
    assert "--position must be" in capsys.readouterr().err
    # bupo sample --projection: greedy text from each projection is what sample_layer gives for it
    for proj in ("raw", "final_norm"):
        assert main(["sample", "--model", str(tmp_path / "m"), "--layer", "1", "--prompt", "Hi", "--projection",
                     proj, "--temperature", "0", "--max-new-tokens", "4", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out[0]["projection"] == proj
        assert out[0]["samples"] == sample_layer(model, tok, "Hi", layer=1, projection=proj, temperature=0,
                                                 max_new_tokens=4)


def test_analysis_config_and_keyword_settings_give_the_same_analysis():
    import dataclasses

    from bupo.analysis import AnalysisConfig, analyze

    tok = char_tokenizer()
    model = make_model(layers=2)
    cfg = AnalysisConfig(projection="final_norm", delta="residual", figures=False, chunk_size=5)
    assert all(f.metadata.get("help") for f in dataclasses.fields(AnalysisConfig))
    a = analyze(model, tok, traces=TRACES, config=cfg).summary
    b = analyze(model, tok, traces=TRACES, projection="final_norm", delta="residual", figures=False, chunk_size=5).summary
    c = analyze(model, tok, traces=TRACES, config=dataclasses.replace(cfg, projection="raw"), projection="final_norm")
    for key in ("layer_entropy", "ffn_entropy_change", "resid_rms", "boundary"):
        assert a[key] == b[key] == c.summary[key], key
    assert a["projection"] == "final_norm" and a["delta_convention"] == "residual"
    with pytest.raises(TypeError, match="unexpected keyword"):
        analyze(model, tok, traces=TRACES, figures=False, projecton="raw")
    with pytest.raises(ValueError, match="lens_top"):
        analyze(model, tok, traces=TRACES, figures=False, lens_top=0)
