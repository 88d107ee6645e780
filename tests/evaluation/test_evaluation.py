"""bupo eval: Pass@K against brute force, Avg@K, resume, rescoring, outputs, the vLLM mapping, CLI end to end."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import types
from fractions import Fraction
from pathlib import Path

import pytest

from bupo.cli import main as cli_main
from bupo.data.datasets import load_rows
from bupo.evaluation import (
    EvalResults,
    SamplingSettings,
    VLLMBackend,
    avg_at_k,
    compare_table,
    default_ks,
    evaluate,
    load_results,
    mean_pass_at_k,
    pass_at_k,
    resolve_template,
    vllm_sampling_kwargs,
)
from bupo.evaluation.backends import require_vllm
from bupo.generation import sample_seed
from support.chat import char_tokenizer, tiny_qwen3
from support.evaluation import ScriptedBackend, toy_rows

# ------------------------------------------------------------------ metrics


def brute_pass_at_k(verdicts: list[int], k: int) -> float:
    """Fraction of the k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(verdicts)), k))
    return sum(any(verdicts[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        verdicts = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(verdicts, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_exact_and_stable() -> None:
    for n, c, k in [
        (300, 0, 256),
        (300, 1, 256),
        (300, 3, 1),
        (300, 7, 64),
        (300, 44, 256),
        (300, 299, 4),
        (300, 300, 1),
    ]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_errors() -> None:
    with pytest.raises(ValueError, match="K between 1 and the samples per problem n=4; got K=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="between 0 and n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="at least one sample"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="integer"):
        pass_at_k(4.0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K between"):
        pass_at_k(4, 1, 0)


def test_avg_at_k_and_pass1() -> None:
    verdicts = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert avg_at_k(verdicts) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k(4, [2, 0, 4], 1) == pytest.approx(avg_at_k(verdicts))  # Avg@K = Pass@1 estimate
    assert mean_pass_at_k(4, [2, 0, 4], 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_k([[1], []])
    assert default_ks(32) == [1, 4, 16] and default_ks(300) == [1, 4, 16, 64, 256] and default_ks(2) == [1]


# ------------------------------------------------------------------ evaluate() with a scripted backend


def expected_verdicts(name: str, rows: list[dict], n: int, seed: int = 0) -> list[list[int]]:
    return [
        [
            int(str(sample_seed(seed, f"{name}/{i}", j) % 3) == r["reward_model"]["ground_truth"])
            for j in range(n)
        ]
        for i, r in enumerate(rows)
    ]


def run_scripted(out_dir, backend=None, **kw) -> EvalResults:
    datasets = kw.pop("datasets", {"amc2023": toy_rows(5), "aime_2024": toy_rows(3)})
    kw.setdefault("template", "octothinker")
    return evaluate(
        None,
        None,
        datasets,
        max_new_tokens=8,
        backend=backend or ScriptedBackend(),
        model_id="toy",
        out_dir=out_dir,
        **kw,
    )


def test_evaluate_metrics_follow_the_verdicts(tmp_path: Path) -> None:
    res = run_scripted(tmp_path, n={"amc2023": 6, "aime_2024": 4}, ks=[1, 2, 4])
    for name, rows, n in [("amc2023", toy_rows(5), 6), ("aime_2024", toy_rows(3), 4)]:
        v = expected_verdicts(name, rows, n)
        b = res.benchmarks[name]
        assert b.n == n and b.problems == len(rows)
        assert b.correct_counts == [sum(r) for r in v]
        assert b.avg == pytest.approx(sum(sum(r) / n for r in v) / len(v))
        for k in (1, 2, 4):
            assert b.pass_at_k[k] == pytest.approx(sum(brute_pass_at_k(r, k) for r in v) / len(v))
    assert res.average == pytest.approx((res.benchmarks["amc2023"].avg + res.benchmarks["aime_2024"].avg) / 2)
    assert 0 < res.benchmarks["amc2023"].truncated < 1


def test_paper_default_samples(tmp_path: Path) -> None:
    res = run_scripted(
        None, datasets={"aime_2025": toy_rows(1), "math500": toy_rows(1), "other": toy_rows(1)}
    )
    assert {k: b.n for k, b in res.benchmarks.items()} == {"aime_2025": 32, "math500": 16, "other": 16}
    assert res.benchmarks["aime_2025"].pass_at_k.keys() == {1, 4, 16}


def test_output_files(tmp_path: Path) -> None:
    res = run_scripted(tmp_path, n=4, ks=[1, 4])
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == (5 + 3) * 4
    rec = lines[0]
    for key in (
        "benchmark",
        "problem",
        "sample",
        "response",
        "extracted",
        "ground_truth",
        "correct",
        "finish_reason",
        "gen",
    ):
        assert key in rec
    assert rec["extracted"] == rec["response"].split("{")[1].rstrip("}")
    assert rec["correct"] == float(rec["extracted"] == rec["ground_truth"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["benchmarks"]["amc2023"]["avg"] == pytest.approx(res.benchmarks["amc2023"].avg)
    assert data["benchmarks"]["aime_2024"]["pass_at_k"]["4"] == pytest.approx(
        res.benchmarks["aime_2024"].pass_at_k[4]
    )
    assert data["settings"]["reward"] == "boxed_exact" and data["settings"]["template"] == "octothinker"
    table = (tmp_path / "table.md").read_text()
    assert "| Model | AMC | AIME24 | Avg |" in table  # the paper's column order: AMC before AIME
    avg_amc = f"{100 * res.benchmarks['amc2023'].avg:.2f}"
    assert f"| model | {avg_amc} |" in table
    assert "Pass@4" in table
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_after_interruption_skips_finished_work(tmp_path: Path) -> None:
    full = run_scripted(tmp_path / "full", n=4)
    partial = ScriptedBackend(batch=4, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_scripted(tmp_path / "resumed", backend=partial, n=4)
    done = len((tmp_path / "resumed" / "samples.jsonl").read_text().splitlines())
    assert done == 12  # three finished batches of 4; the batch in flight is lost
    rest = ScriptedBackend()
    resumed = run_scripted(tmp_path / "resumed", backend=rest, n=4)
    assert len(rest.seen) == 32 - 12 and not set(rest.seen) & set(partial.seen)
    assert resumed.benchmarks["amc2023"].correct_counts == full.benchmarks["amc2023"].correct_counts
    assert resumed.benchmarks["aime_2024"].avg == full.benchmarks["aime_2024"].avg
    assert resumed.benchmarks["amc2023"].reused + resumed.benchmarks["aime_2024"].reused == 12
    # a third run generates nothing; a larger n generates only the new samples
    again = ScriptedBackend()
    run_scripted(tmp_path / "resumed", backend=again, n=4)
    assert again.seen == []
    more = ScriptedBackend()
    run_scripted(tmp_path / "resumed", backend=more, n=6)
    assert len(more.seen) == 8 * 2


def test_resume_survives_a_torn_last_line(tmp_path: Path) -> None:
    run_scripted(tmp_path, n=2)
    path = tmp_path / "samples.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the last record cut mid-write
    again = ScriptedBackend()
    res = run_scripted(tmp_path, backend=again, n=2)
    assert len(again.seen) == 1
    assert res.settings["skipped_unreadable_sample_lines"] == 1
    assert len(_load_lines(path)) == 16  # the repaired file reads back whole (torn line skipped)


def _load_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def test_changed_settings_regenerate(tmp_path: Path) -> None:
    run_scripted(tmp_path, n=2)
    b = ScriptedBackend()
    run_scripted(tmp_path, backend=b, n=2, temperature=0.5)
    assert len(b.seen) == 16
    c = ScriptedBackend()
    datasets = {"amc2023": toy_rows(5), "aime_2024": toy_rows(3)}
    datasets["amc2023"][0]["prompt"][0]["content"] = "a different problem 0"
    run_scripted(tmp_path, backend=c, n=2, datasets=datasets)
    assert len(c.seen) == 2  # only the changed problem's samples


def test_other_reward_rescores_without_generating(tmp_path: Path) -> None:
    gts = ["0", "1", "2", "0", "1"]
    run_scripted(tmp_path, n=3, datasets={"amc2023": toy_rows(5, gts)})
    b = ScriptedBackend()
    res = run_scripted(tmp_path, backend=b, n=3, datasets={"amc2023": toy_rows(5, gts)}, reward="math_verify")
    assert b.seen == []
    v = expected_verdicts("amc2023", toy_rows(5, gts), 3)
    assert res.benchmarks["amc2023"].correct_counts == [sum(r) for r in v]
    assert res.settings["reward"] == "math_verify"
    last = {}
    for r in _load_lines(tmp_path / "samples.jsonl"):
        last[(r["problem"], r["sample"])] = r["reward"]
    assert set(last.values()) == {"math_verify"}


def test_evaluate_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amc2023: Pass@8 needs at least 8 samples per problem but n=4"):
        run_scripted(tmp_path, n=4, ks=[1, 8])
    assert not (tmp_path / "samples.jsonl").exists() or not (tmp_path / "samples.jsonl").read_text()
    with pytest.raises(ValueError, match="accepted: boxed_exact, math_verify"):
        run_scripted(None, reward="exact")
    with pytest.raises(ValueError, match="accepted: auto, qwen3_no_thinking"):
        run_scripted(None, template="plain")
    with pytest.raises(ValueError, match="non-empty mapping"):
        run_scripted(None, datasets={})
    with pytest.raises(ValueError, match="missing column"):
        run_scripted(None, datasets={"x": [{"question": "q"}]})
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        run_scripted(None, n=0)
    with pytest.raises(ValueError, match="model_id is required"):
        evaluate(
            None,
            None,
            {"x": toy_rows(1)},
            max_new_tokens=4,
            template="octothinker",
            backend=ScriptedBackend(),
        )
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate(None, None, {"x": toy_rows(1)}, max_new_tokens=4, template="octothinker", backend="tgi")


def test_metrics_for_trainer_logging() -> None:
    res = run_scripted(None, n=4, ks=[1, 4])
    m = res.metrics()
    assert m["eval/amc2023/avg@4"] == res.benchmarks["amc2023"].avg
    assert m["eval/aime_2024/pass@4"] == res.benchmarks["aime_2024"].pass_at_k[4]
    assert m["eval/avg"] == res.average


def test_compare_table(tmp_path: Path) -> None:
    run_scripted(tmp_path / "a", n=2, label="GRPO")
    run_scripted(tmp_path / "b", n=4, seed=1, label="BuPO", datasets={"amc2023": toy_rows(5)})
    runs = [("GRPO", load_results(tmp_path / "a")), ("BuPO", load_results(tmp_path / "b"))]
    table = compare_table(runs)
    assert "| Model | AMC | AIME24 | Avg |" in table
    bupo_row = next(line for line in table.splitlines() if line.startswith("| BuPO"))
    assert bupo_row.endswith("| – | – |")  # not evaluated on AIME24, so no Avg either
    assert "AMC Avg@2/4" in table
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results(tmp_path / "missing")


# ------------------------------------------------------------------ vLLM


def test_vllm_sampling_mapping() -> None:
    kw = vllm_sampling_kwargs(SamplingSettings(max_new_tokens=100, temperature=1.0, top_p=1.0), seed=7, n=16)
    assert kw["n"] == 16 and kw["temperature"] == 1.0 and kw["top_p"] == 1.0
    assert kw["top_k"] == -1 and kw["max_tokens"] == 100 and kw["seed"] == 7
    assert kw["repetition_penalty"] == 1.0 and kw["min_p"] == 0.0 and kw["skip_special_tokens"] is True
    kw = vllm_sampling_kwargs(
        SamplingSettings(max_new_tokens=5, temperature=0.0, top_p=0.9, top_k=20), seed=1
    )
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["n"]) == (0.0, 0.9, 20, 1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(max_new_tokens=5, top_p=1.5)


def test_vllm_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'bupo\[vllm\]'"):
        require_vllm()
    assert cli_main(["eval", "--backend", "vllm", "--model", str(tmp_path), "--no-progress"]) == 2


def test_vllm_backend_flow_with_a_fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params_seen = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            params_seen.append(kw)

    class LLM:
        def generate(self, prompts, params, use_tqdm=False):
            assert len(prompts) == len(params)
            outs = []
            for p in params:
                o = types.SimpleNamespace(
                    text=f"\\boxed{{{p.kw['seed'] % 3}}}", token_ids=[5, 6], finish_reason="stop"
                )
                outs.append(types.SimpleNamespace(outputs=[o]))
            return outs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams, LLM=LLM))
    backend = VLLMBackend(LLM(), batch_size=5)
    res = evaluate(
        None, None, {"amc2023": toy_rows(4)}, n=3, max_new_tokens=9, temperature=0.8, top_p=0.95,
        template="octothinker", backend=backend, model_id="fake", out_dir=tmp_path,
    )  # fmt: skip
    assert len(params_seen) == 12
    seeds = {sample_seed(0, f"amc2023/{i}", j) for i in range(4) for j in range(3)}
    assert {p["seed"] for p in params_seen} == seeds
    assert all(
        p["n"] == 1
        and p["temperature"] == 0.8
        and p["top_p"] == 0.95
        and p["top_k"] == -1
        and p["max_tokens"] == 9
        for p in params_seen
    )
    v = expected_verdicts("amc2023", toy_rows(4), 3)
    assert res.benchmarks["amc2023"].correct_counts == [sum(r) for r in v]
    assert res.settings["backend"] == "vllm"


# ------------------------------------------------------------------ real model, in-process and CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = char_tokenizer()
    model = tiny_qwen3(tok, seed=3, context=4096)  # real AIME/AMC prompts fit (char tokens)
    model.generation_config.max_new_tokens = 12
    path = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_real_model_matches_samples(tmp_path: Path) -> None:
    tok = char_tokenizer()
    model = tiny_qwen3(tok, seed=3, context=4096)  # real AIME/AMC prompts fit (char tokens)
    rows = load_rows("amc23")[:3]
    res = evaluate(
        model, tok, {"amc2023": rows}, n=3, ks=[1, 3], max_new_tokens=10, out_dir=tmp_path, batch_size=4
    )
    assert res.settings["template"] == "qwen3_no_thinking"  # auto: the chat template honours enable_thinking
    recs = _load_lines(tmp_path / "samples.jsonl")
    assert len(recs) == 9
    counts = [sum(r["correct"] for r in recs if r["problem"] == i) for i in range(3)]
    assert res.benchmarks["amc2023"].correct_counts == counts
    # the random tiny model never writes the right boxed answer; the file is still complete
    assert all(r["finish_reason"] in ("stop", "length") and r["num_tokens"] <= 10 for r in recs)
    # same call again: everything reused, identical results; the weights change -> regenerated
    again = evaluate(model, tok, {"amc2023": rows}, n=3, ks=[1, 3], max_new_tokens=10, out_dir=tmp_path)
    assert again.benchmarks["amc2023"].reused == 9
    import torch

    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    changed = evaluate(model, tok, {"amc2023": rows}, n=3, ks=[1, 3], max_new_tokens=10, out_dir=tmp_path)
    assert changed.benchmarks["amc2023"].reused == 0


def test_auto_template() -> None:
    assert resolve_template(char_tokenizer(), "auto") == "qwen3_no_thinking"
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert resolve_template(char_tokenizer(chat_template=plain), "auto") == "chat"
    assert resolve_template(char_tokenizer(chat_template=None), "auto") == "octothinker"


def test_cli_end_to_end_and_compare(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    amc = _write_jsonl(tmp_path / "amc23.jsonl", load_rows("amc23")[:2])
    aime = _write_jsonl(tmp_path / "aime24.jsonl", load_rows("aime24")[:2])
    out = tmp_path / "run"
    args = ["eval", "--model", str(model_dir), "--data", str(amc), str(aime), "--n", "2", "--k", "1", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| Model | AMC | AIME24 | Avg |" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["max_new_tokens"] == 12  # from the folder's generation_config
    assert data["label"] == model_dir.name
    assert set(data["benchmarks"]) == {"amc2023", "aime_2024"}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8
    assert cli_main(args) == 0  # resume: nothing new
    data2 = json.loads((out / "results.json").read_text())
    assert sum(b["reused"] for b in data2["benchmarks"].values()) == 8
    capsys.readouterr()
    assert cli_main(["eval", "compare", str(out), str(out), "--labels", "base", "again"]) == 0
    table = capsys.readouterr().out
    assert "| base |" in table and "| again |" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "2", "--k", "4"], "Pass@4 needs at least 4 samples per problem but n=2"),
        (["--data", "{bad}"], "missing column"),
        (["--data", "{csv}"], "unsupported data format '.csv'"),
        (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such folder"),
        (["--problems", "0"], "--limit must be >= 1"),  # --problems: the old spelling of --limit
    ],
)
def test_cli_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}])
    csv = tmp_path / "x.csv"
    csv.write_text("a\n")
    good = _write_jsonl(tmp_path / "amc23.jsonl", load_rows("amc23")[:1])
    extra = [e.replace("{bad}", str(bad)).replace("{csv}", str(csv)) for e in extra]
    args = ["eval", "--no-progress", "--out", str(tmp_path / "o")]
    if "--model" not in extra:
        args += ["--model", str(model_dir)]
    if "--data" not in extra:
        args += ["--data", str(good)]
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_device_and_missing_bundled_model_are_one_line_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import bupo.models.registry

    good = _write_jsonl(tmp_path / "amc23.jsonl", load_rows("amc23")[:1])
    base = ["eval", "--no-progress", "--out", str(tmp_path / "o"), "--data", str(good)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main([*base, "--model", str(model_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1
    monkeypatch.setattr(bupo.models.registry, "BUNDLED_DIR", tmp_path / "no_model")
    assert cli_main(base) == 2
    err = capsys.readouterr().err
    assert "bundled model is missing" in err and err.count("\n") == 1


def test_bundled_model_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bupo.zoo import DEFAULT_MODEL

    assert (Path(DEFAULT_MODEL) / "config.json").exists(), "the bundled model ships with the package"
    out = tmp_path / "bundled"
    assert cli_main(["eval", "--problems", "6", "--n", "4", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["benchmarks"]) == {"bundled_test"}
    b = data["benchmarks"]["bundled_test"]
    assert b["problems"] == 6 and b["n"] == 4
    # the bundled model is trained on this task: it solves some problems, and its answers are boxed
    recs = _load_lines(out / "samples.jsonl")
    assert sum(r["extracted"] is not None for r in recs) >= len(recs) // 2
    assert b["avg"] > 0
