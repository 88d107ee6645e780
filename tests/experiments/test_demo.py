"""bupo demo / reproduce: the orchestration end to end (tiny budgets) and the statistics they report."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from bupo.experiments.report import markdown_table_to_html
from bupo.experiments.reproduce import refinement_metrics, refinement_over_training
from bupo.experiments.steps import paired_ci
from support.tiny_models import random_batch, tiny_model


def test_paired_ci_matches_student_t():
    diffs = [0.02, -0.01, 0.05, 0.03, 0.00]
    mean, lo, hi = paired_ci(diffs)
    half = 2.776 * statistics.stdev(diffs) / 5**0.5  # t_{0.975, df=4}
    assert mean == pytest.approx(0.018)
    assert (lo, hi) == pytest.approx((0.018 - half, 0.018 + half))


def test_refinement_metrics_against_dense_reference():
    m = tiny_model("qwen3", layers=4)
    ids, mask = random_batch(m, batch=2, seq=9)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, 3:8] = True
    k = 1
    got = refinement_metrics(m, ids, mask, positions, k=k)
    hs = m(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with torch.no_grad():
        # raw residual stream after layer j: hidden_states[j+1] for j < L-1 (the last one is post-norm in HF)
        from bupo.internal import capture_streams

        with capture_streams(m, streams=["resid_post"], layers=[3]) as st:
            m(ids, attention_mask=mask)
        raw = {j: hs[j + 1][positions] for j in range(3)} | {3: st[("resid_post", 3)][positions]}
        lp = {j: torch.log_softmax(m.lm_head(h).double(), -1) for j, h in raw.items()}
        for j in (2, 3):
            cos = torch.nn.functional.cosine_similarity(raw[k], raw[j], dim=-1).mean().item()
            kl = (lp[k].exp() * (lp[k] - lp[j])).sum(-1).mean().item()
            assert got["cos"][j] == pytest.approx(cos, abs=1e-5)
            assert got["kl"][j] == pytest.approx(kl, abs=1e-4)
        ent = {j: -(lp[j].exp() * lp[j]).sum(-1).mean().item() for j in lp}
        lp_prev = torch.log_softmax(m.lm_head(hs[k][positions]).double(), -1)
        h_prev = -(lp_prev.exp() * lp_prev).sum(-1).mean().item()
        assert got["delta_h_layer_k"] == pytest.approx(ent[k] - h_prev, abs=1e-4)


def test_refinement_over_training_reuses_the_given_base_row_and_caches(tmp_path):
    m = tiny_model("qwen3", layers=4)
    ids, mask = random_batch(m, batch=2, seq=9)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, 2:8] = True
    probe = (ids, mask, positions)
    run = tmp_path / "run"
    for step, seed in ((4, 1), (2, 2)):
        tiny_model("qwen3", layers=4, seed=seed).save_pretrained(run / f"checkpoint-{step}")
    base = {"step": 0, "marker": "measured elsewhere"}
    rows = refinement_over_training(run, 1, probe, base=base)
    assert rows[0] == base  # not measured again (the bundled model would not even fit this probe's vocabulary)
    assert [r["step"] for r in rows] == [0, 2, 4]
    ref = refinement_metrics(tiny_model("qwen3", layers=4, seed=2), ids, mask, positions, k=1)
    assert rows[1]["delta_h_layer_k"] == pytest.approx(ref["delta_h_layer_k"], abs=1e-6)
    assert rows[1]["kl"][3] == pytest.approx(ref["kl"][3], abs=1e-6)
    # a rerun reads the cache (JSON: layer keys become strings) instead of measuring
    cached = refinement_over_training(run, 1, probe=None)
    assert cached[0] == base and cached[2]["entropy_k"] == pytest.approx(rows[2]["entropy_k"])


def test_markdown_tables_become_html_tables():
    html = markdown_table_to_html("Title line\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n- item")
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>&lt;2&gt;</td></tr></table>" in html
    assert "<p>Title line</p>" in html and "<li>item</li>" in html


@pytest.mark.slow
@pytest.mark.xdist_group("training")
def test_demo_end_to_end_on_the_bundled_model(tmp_path, capsys):
    from bupo.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--rollout-steps", "2", "--internal-steps", "1",
               "--analysis-samples", "4", "--eval-problems", "6", "--eval-samples", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| GRPO |" in printed and "| BuPO |" in printed
    res = json.loads((out / "results.json").read_text())
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    k = res["settings"]["internal_layer"]
    assert k == summary["suggested_internal_layer"]
    bupo_run = json.loads((out / "bupo" / "bupo_run.json").read_text())
    grpo_run = json.loads((out / "grpo" / "bupo_run.json").read_text())
    assert bupo_run["internal_layer"] == k and bupo_run["internal_steps"] == 1
    assert grpo_run["internal_steps"] == 0
    log = json.loads((out / "bupo" / "log_history.json").read_text())
    phases = [r["bupo/phase"] for r in log if "bupo/phase" in r]
    assert phases and phases[0] == 1.0 and phases[-1] == 0.0  # internal first, then full
    for label in ("base", "GRPO", "BuPO"):
        assert set(res["results"][label]["benchmarks"]) == {"bundled_test"}
    # base and GRPO's step-0 evaluation are the same evaluation
    assert res["results"]["base"]["benchmarks"]["bundled_test"]["n"] == 2
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # analysis figures + training curves
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert f"k = <b>{k}</b>" in page
    # resumable: a rerun reuses the finished analysis, trainings and evaluations
    mtime = (out / "bupo" / "bupo_run.json").stat().st_mtime
    assert main(["demo", "--out", str(out), "--rollout-steps", "2", "--internal-steps", "1",
                 "--analysis-samples", "4", "--eval-problems", "6", "--eval-samples", "2"]) == 0
    assert (out / "bupo" / "bupo_run.json").stat().st_mtime == mtime


def test_demo_rejects_bad_budgets(capsys):
    from bupo.cli import main

    assert main(["demo", "--internal-steps", "5", "--rollout-steps", "2"]) == 2
    assert "--internal-steps must be in 0..--rollout-steps" in capsys.readouterr().err
    assert main(["demo", "--eval-samples", "0"]) == 2


def test_demo_and_reproduce_share_one_home_for_their_steps():
    import bupo.experiments.demo as demo
    import bupo.experiments.reproduce as reproduce
    import bupo.experiments.steps as steps

    # no import circle: both take the shared steps from bupo.experiments.steps, neither reaches into the other
    for mod in (demo, reproduce):
        assert mod.run_training is steps.run_training
        assert mod.eval_results is steps.eval_results
    src = {m: Path(m.__file__).read_text(encoding="utf-8") for m in (demo, reproduce)}
    assert "bupo.experiments.reproduce" not in src[demo] and "from bupo.experiments.demo " not in src[reproduce]


def test_reproduce_real_model_rejects_bad_input(tmp_path, capsys):
    from bupo.cli import main

    assert main(["reproduce", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err  # the one resolver every --model uses (bupo.models)
    assert main(["reproduce", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--projection", "lens"]) == 2
    assert "--projection takes a comma-separated list of raw, final_norm" in capsys.readouterr().err
    assert main(["reproduce", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--completions", "20"]) == 2
    assert "--completions must be a multiple of 16" in capsys.readouterr().err
    assert main(["reproduce", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--auto-cap", "9"]) == 2
    assert "--auto-cap must be in 1..--rollout-steps (8)" in capsys.readouterr().err
    assert main(["reproduce", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--temperature", "0"]) == 2
    assert "--temperature must be a finite number > 0" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--keep-checkpoints"]) == 2
    assert "--keep-checkpoints applies to --model runs" in capsys.readouterr().err


def test_drop_checkpoints_only_of_a_finished_run(tmp_path):
    from bupo.experiments.steps import drop_checkpoints

    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "optimizer.pt").write_bytes(b"x" * 1000)
    (run / "model.safetensors").write_bytes(b"w")
    assert drop_checkpoints(run) == 0 and (run / "checkpoint-4").is_dir()  # unfinished: a rerun resumes from it
    (run / "bupo_run.json").write_text("{}")
    assert drop_checkpoints(run) == 1000
    assert not (run / "checkpoint-4").exists() and (run / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.xdist_group("training")
def test_reproduce_real_model_end_to_end_on_a_checkpoint_folder(tmp_path, capsys):
    """The real-model experiment's plumbing on the bundled checkpoint folder (any folder works the same way)."""
    from bupo.cli import main
    from bupo.zoo import bundled_model_path

    out = tmp_path / "real"
    argv = ["reproduce", "--model", str(bundled_model_path()), "--out", str(out), "--rollout-steps", "2",
            "--internal-steps", "1", "--internal-layer", "1", "--projection", "raw,final_norm", "--completions", "16",
            "--eval-problems", "3", "--eval-samples", "2", "--max-completion-length", "8", "--temperature", "0.9",
            "--auto-cap", "1", "--arms", "grpo,bupo,layers-only,one-layer,random-reward"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"grpo-seed0", "bupo-raw-seed0", "bupo-final_norm-seed0", "bupo-raw-auto1-seed0",
                                "bupo-final_norm-auto1-seed0", "layers-only-seed0", "one-layer-seed0",
                                "random-reward-seed0"}
    # the control arms: what each run was told to train, and the spurious reward at the measured base accuracy
    arm_runs = {n: json.loads((out / "runs" / n / "bupo_run.json").read_text())
                for n in ("layers-only-seed0", "one-layer-seed0", "random-reward-seed0")}
    assert arm_runs["layers-only-seed0"]["arm"] == "layers-only" and arm_runs["layers-only-seed0"]["internal_steps"] == 1
    assert arm_runs["one-layer-seed0"]["arm"] == "one-layer" and arm_runs["one-layer-seed0"]["train_layer"] == 4
    assert arm_runs["random-reward-seed0"]["random_reward"] == res["runs"]["grpo-seed0"]["before"]["avg"]
    assert res["settings"]["arms"] == ["grpo", "bupo", "layers-only", "one-layer", "random-reward"]
    for run in res["runs"].values():  # format against correctness, from each run's last samples.jsonl
        shape = run["shape"]
        assert set(shape) == {"truncated", "answered", "correct_when_answered"}
        assert all(0.0 <= v <= 1.0 for v in shape.values())
        assert shape["truncated"] + shape["answered"] <= 1.0 + 1e-9
    assert res["settings"]["internal_layer"] == 1 and res["settings"]["s_inter_fraction"] == 0.5
    assert res["settings"]["temperature"] == 0.9 and res["settings"]["auto_cap"] == 1
    assert res["settings"]["runs_seconds"] == pytest.approx(sum(
        json.loads((out / "runs" / n / "bupo_run.json").read_text())["seconds"] for n in res["runs"]), abs=0.1)
    for name in ("bupo-raw-auto1-seed0", "bupo-final_norm-auto1-seed0"):
        run = json.loads((out / "runs" / name / "bupo_run.json").read_text())
        assert run["switch"]["step"] == 2 and "cap reached" in run["switch"]["reason"]  # cap 1: rollout step 2 is full
        assert res["runs"][name]["switch"] == run["switch"]
    assert json.loads((out / "runs" / "grpo-seed0" / "bupo_run.json").read_text())["temperature"] == 0.9
    for name, proj in (("bupo-raw-seed0", "raw"), ("bupo-final_norm-seed0", "final_norm")):
        run = json.loads((out / "runs" / name / "bupo_run.json").read_text())
        assert run["internal_layer"] == 1 and run["internal_steps"] == 1
        assert run["reward"] == "final_number"
        assert set(res["runs"][name]["phases"]) == {"internal", "full"}  # one rollout step in each phase
        assert res["runs"][name]["projection"] == proj
    assert "internal" not in res["runs"]["grpo-seed0"]["phases"]
    assert (out / "figures" / "rewards.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| base |" in table and "| GRPO |" in table and "| BuPO (final_norm) |" in table
    assert "| one-layer (layer 4) | 1 |" in table and "correct when answered" in table
    # the base model's format too (GRPO's evaluation before training), and one seed said in the headline
    assert set(res["runs"]["grpo-seed0"]["before_shape"]) == {"truncated", "answered", "correct_when_answered"}
    assert "| base | 1 |" in table and table.startswith("One seed per arm")
    # 2 samples per problem: Pass@2 (any sample right) next to Avg@2, from each problem's correct count
    counts = json.loads(sorted((out / "runs" / "grpo-seed0" / "evals").glob("step-*/results.json"))[-1].read_text())
    counts = counts["benchmarks"]["arith_d1_test"]["correct_counts"]
    assert res["runs"]["grpo-seed0"]["after"]["pass@2"] == sum(c >= 1 for c in counts) / len(counts)
    assert "| run | avg | pass@1 | pass@2 |" in table
    # a finished run keeps its final model, evaluations and logs, not its checkpoint (--keep-checkpoints keeps it)
    assert res["settings"]["checkpoints_kept"] is False
    for name in res["runs"]:
        run_dir = out / "runs" / name
        assert not list(run_dir.glob("checkpoint-*")), name
        assert list(run_dir.glob("*.safetensors")) and (run_dir / "log_history.json").is_file()
    assert "its checkpoint deleted" in capsys.readouterr().out
    # resumable: a rerun reuses every finished run
    mtime = (out / "runs" / "grpo-seed0" / "bupo_run.json").stat().st_mtime
    assert main(argv) == 0
    assert (out / "runs" / "grpo-seed0" / "bupo_run.json").stat().st_mtime == mtime
