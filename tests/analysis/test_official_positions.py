"""``positions="official"`` (``bupo analyze --preset official``): the official script's token positions,
``hidden_states[P'+1:]`` with ``P'`` = the index of the first "assistant" token + 1, checked against a dense fp64
reference computed straight from ``model(..., output_hidden_states=True).hidden_states``; the default stays one
earlier (each position whose prediction is a response token)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bupo.analysis import analyze
from bupo.analysis import traces as traces_mod
from bupo.analysis.cli import POSITION_CHOICES, _apply_preset
from bupo.analysis.config import POSITION_CONVENTIONS, POSITIONS, AnalysisConfig
from bupo.cli import build_parser
from bupo.cli import main as cli_main
from support.analysis import char_tokenizer
from support.tiny_models import tiny_model

TRACES = [
    {"prompt": [{"role": "system", "content": "Reason."}, {"role": "user", "content": "Compute 2+3."}],
     "response": "2+3=5, so \\boxed{5}"},
    {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "response": "Hello there!"},
    {"prompt": [{"role": "user", "content": "7*6?"}], "response": "42<eos>"},
]


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer()
    t.add_tokens(["assistant"])  # one token, as in real chat vocabularies: the official split searches for it
    return t


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", layers=3, tie=True, vocab_size=128, seed=5)


def official_slices(tok, traces):
    """Per trace: the full ids and the official script's analysed positions, found as it finds them."""
    assistant = tok("assistant", add_special_tokens=False)["input_ids"][-1]
    out = []
    for tr in traces_mod.tokenize_traces(tok, traces, "chat"):
        ids = tr.prompt_ids + tr.response_ids
        prompt_len = ids.index(assistant) + 1  # the official prompt length P'
        out.append((ids, list(range(prompt_len + 1, len(ids)))))  # hidden_states[P'+1:]
    return out


def dense_reference(model, tok, traces):
    """fp64 entropies of softmax(lm_head(h)) for every hidden_states[i] over the official positions, and the
    final policy's entropy / log-prob of the next token (EOS after the last), one sample per forward."""
    L = model.config.num_hidden_layers
    cols: dict[str, list] = {}
    W = model.lm_head.weight.detach().double()
    for ids, pos in official_slices(tok, traces):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        hs = out.hidden_states  # [0] embeddings, [k+1] layer k's output ([L]: final-normed by HF)
        for i in range(L + 1):
            logp = torch.log_softmax(hs[i][0, pos].double() @ W.T, -1)
            cols.setdefault(f"hs{i}", []).append(-(logp.exp() * logp).sum(-1))
        logp = torch.log_softmax(out.logits[0, pos].double(), -1)
        nxt = torch.tensor(ids[pos[0] + 1:] + [tok.eos_token_id])
        cols.setdefault("final", []).append(-(logp.exp() * logp).sum(-1))
        cols.setdefault("final_lp", []).append(logp.gather(-1, nxt[:, None])[:, 0])
        cols.setdefault("position", []).append(torch.tensor(pos))
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


@pytest.mark.parametrize("batch_tokens", [1, 10_000])  # one sample per forward; all samples padded together
def test_official_positions_match_hidden_states_reference(model, tok, batch_tokens):
    res = analyze(model, tok, traces=TRACES, positions="official", figures=False, token_dtype="float32",
                  batch_tokens=batch_tokens)
    ref = dense_reference(model, tok, TRACES)
    t = res.tokens
    L = res.num_layers
    assert t["position"].tolist() == ref["position"].tolist()
    assert np.allclose(t["H.resid_pre.0"], ref["hs0"], atol=1e-5, rtol=0)
    for k in range(L - 1):  # HF's hidden_states[L] is final-normed; the raw last layer has no counterpart there
        assert np.allclose(t[f"H.resid_post.{k}"], ref[f"hs{k + 1}"], atol=1e-5, rtol=0), k
    assert np.allclose(t["H.final"], ref["final"], atol=1e-5, rtol=0)
    assert np.allclose(t["H.final"], ref[f"hs{L}"], atol=1e-5, rtol=0)  # the model's own policy
    assert np.allclose(t["logp.final"], ref["final_lp"], atol=1e-5, rtol=0)
    assert res.summary["final_entropy"] == pytest.approx(float(ref["final"].mean()), abs=1e-5)
    assert res.summary["embed_entropy"] == pytest.approx(float(ref["hs0"].mean()), abs=1e-5)
    assert res.summary["positions"] == "official"
    assert res.summary["position_convention"] == POSITION_CONVENTIONS["official"]


def test_official_rows_are_the_response_tokens_own_positions_one_after_the_default(model, tok):
    off = analyze(model, tok, traces=TRACES, positions="official", figures=False, token_dtype="float32").tokens
    dft = analyze(model, tok, traces=TRACES, figures=False, token_dtype="float32")
    assert dft.summary["positions"] == "predicting"
    d = dft.tokens
    for i, tr in enumerate(traces_mod.tokenize_traces(tok, TRACES, "chat")):
        P, R = len(tr.prompt_ids), len(tr.response_ids)
        o_rows, d_rows = off[off["sample"] == i], d[d["sample"] == i]
        assert o_rows["position"].tolist() == list(range(P, P + R))
        assert d_rows["position"].tolist() == list(range(P - 1, P + R - 1))
        assert o_rows["token_id"].tolist() == d_rows["token_id"].tolist() == tr.response_ids
        # the same hidden states, one row later: official row j is default row j + 1
        assert np.allclose(o_rows["H.resid_post.1"].to_numpy()[:-1], d_rows["H.resid_post.1"].to_numpy()[1:],
                           atol=1e-5)


def test_positions_setting_is_validated_and_the_preset_selects_official() -> None:
    assert tuple(POSITIONS) == POSITION_CHOICES and set(POSITION_CONVENTIONS) == set(POSITIONS)
    with pytest.raises(ValueError, match="unknown positions 'next'; accepted: predicting, official"):
        AnalysisConfig(positions="next", figures=False).validate(out_dir=None)

    def resolved(*argv):
        args = build_parser().parse_args(["analyze", *argv])
        _apply_preset(args)
        return args.positions

    assert resolved() == "predicting"
    assert resolved("--preset", "official") == "official"
    assert resolved("--preset", "official", "--positions", "predicting") == "predicting"  # explicit flag wins
    assert resolved("--positions", "official") == "official"


def test_cli_preset_official_records_the_official_positions(tmp_path) -> None:
    out = tmp_path / "official"
    assert cli_main(["analyze", "--preset", "official", "--max-new-tokens", "6", "--limit", "1", "--out", str(out),
                     "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["positions"] == "official" and "hidden_states[P'+1:]" in s["position_convention"]
    assert s["preset"]["settings"]["positions"] == "official"
