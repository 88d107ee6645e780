"""``bupo eval --policy-layer K [--projection raw|final_norm]``: Avg@K / Pass@K of the internal policy pi^k, sampled
through ``bupo sample --layer``'s sampler (bupo.internal.internal_policy), recorded in results.json, keyed apart from
the model's own samples, refused with vLLM. Bundled model and tiny random-init Qwen3 models, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bupo.cli import main as cli_main
from bupo.evaluation import evaluate
from bupo.evaluation.backends import HFBackend, SamplingSettings
from bupo.generation import generate_requests
from bupo.internal import internal_policy, parts
from support.chat import char_tokenizer, tiny_qwen3


def toy_rows(count: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"problem {i}"}], "reward_model": {"ground_truth": str(i % 3)}}
            for i in range(count)]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_pi_k_of_the_bundled_model_is_recorded_and_differs_from_pi(tmp_path, capsys):
    base = ["eval", "--problems", "3", "--n", "2", "--k", "1", "2", "--no-progress"]
    assert cli_main([*base, "--out", str(tmp_path / "pi")]) == 0
    assert cli_main([*base, "--out", str(tmp_path / "pik"), "--policy-layer", "2"]) == 0
    err = capsys.readouterr().err
    assert "sampled from pi^k, k = 2 (0-based; paper layer 3), raw" in err
    pi, pik = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("pi", "pik"))
    assert pik["settings"]["policy"]["layer"] == 2 and pik["settings"]["policy"]["projection"] == "raw"
    assert pik["settings"]["policy"]["paper_layer"] == 3
    assert pi["settings"]["policy"]["layer"] is None  # the model's own policy, said so
    assert pik["label"] == "bundled-layer2-raw"
    assert set(pik["benchmarks"]) == set(pi["benchmarks"])  # the same problems, so Pass@K compares
    assert pik["settings"]["gen_hash"] != pi["settings"]["gen_hash"]
    a, b = lines(tmp_path / "pi" / "samples.jsonl"), lines(tmp_path / "pik" / "samples.jsonl")
    assert [r["problem"] for r in a] == [r["problem"] for r in b]
    assert [r["response"] for r in a] != [r["response"] for r in b]


def test_the_backend_samples_with_bupo_samples_sampler():
    tok = char_tokenizer()
    model = tiny_qwen3(tok, seed=1, layers=4)
    requests = [("user: 1+1?\nassistant: ", 11), ("user: 2+2?\nassistant: ", 12)]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=None)
    got = HFBackend(model, tok, policy_layer=1).generate(requests, settings)
    with internal_policy(model, 1, "raw"):
        want = generate_requests(model, tok, requests, max_new_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    own = HFBackend(model, tok).generate(requests, settings)
    assert [c.token_ids for c in own] != [c.token_ids for c in got]
    assert len(parts(model).layers) == 4  # the model is whole again after sampling
    # the last layer read through the final norm is the model's own policy: the same samples
    last = HFBackend(model, tok, policy_layer=3, projection="final_norm").generate(requests, settings)
    assert [c.token_ids for c in last] == [c.token_ids for c in own]


def test_pi_and_pi_k_samples_are_never_reused_for_each_other(tmp_path):
    tok = char_tokenizer()
    model = tiny_qwen3(tok, seed=2, context=1024)
    kw = dict(n=2, ks=[1, 2], max_new_tokens=4, out_dir=tmp_path, template="octothinker", batch_size=4)
    evaluate(model, tok, {"amc2023": toy_rows(3)}, **kw)
    pik = evaluate(model, tok, {"amc2023": toy_rows(3)}, policy_layer=0, **kw)
    assert pik.benchmarks["amc2023"].reused == 0
    again = evaluate(model, tok, {"amc2023": toy_rows(3)}, policy_layer=0, **kw)
    assert again.benchmarks["amc2023"].reused == 6
    raw_vs_norm = evaluate(model, tok, {"amc2023": toy_rows(3)}, policy_layer=0, projection="final_norm", **kw)
    assert raw_vs_norm.benchmarks["amc2023"].reused == 0
    with pytest.raises(ValueError, match="out of range"):
        evaluate(model, tok, {"amc2023": toy_rows(3)}, policy_layer=9, **kw)
    with pytest.raises(ValueError, match="needs backend 'hf'"):
        evaluate(None, tok, {"amc2023": toy_rows(3)}, policy_layer=0, backend=object(), model_id="x",
                 **{**kw, "out_dir": None})


@pytest.mark.parametrize(("extra", "message"), [
    (["--policy-layer", "1", "--backend", "vllm"], "use --backend hf (or auto), not --backend vllm"),
    (["--projection", "final_norm"], "--projection chooses how pi^k reads H^k: it needs --policy-layer K"),
    (["--policy-layer", "-1"], "--policy-layer must be a 0-based layer >= 0"),
    (["--policy-layer", "99"], "layer 99 out of range"),
])
def test_bad_policy_layer_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    assert cli_main(["eval", "--problems", "1", "--n", "1", "--k", "1", "--no-progress",
                     "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
