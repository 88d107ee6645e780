"""bupo reproduce --arms and the seed tables of reproduce and demo: the seeds behind each number, the paired 95% CI
against GRPO, one seed said so. The trainings are replaced by recorded numbers (no model is trained here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bupo.cli import main as cli_main
from bupo.experiments import reproduce
from bupo.experiments.steps import paired_ci, seed_table, seeds_headline


def m(avg: float, p4: float) -> dict[str, float]:
    return {"avg": avg, "pass@4": p4}


def test_one_seed_has_no_interval_and_says_so():
    md, stats = seed_table(m(0.5, 0.7), {"grpo": [m(0.6, 0.8)], "bupo": [m(0.62, 0.79)]})
    assert "| seeds |" in md.splitlines()[0]
    row = next(r for r in md.splitlines() if r.startswith("| avg |") and "BuPO" in r)
    assert "| 1 |" in row and "+2.00" in row and "none (1 seed)" in row and "±" not in row
    assert stats["avg"]["seeds"] == 1 and stats["avg"]["diff_mean"] == pytest.approx(0.02)
    assert "One seed" in seeds_headline(1, ["grpo", "bupo"]) and "no confidence interval" in seeds_headline(1, ["grpo"])


def test_every_arm_gets_its_seeds_and_the_paired_ci_against_grpo():
    g = [m(0.60, 0.8), m(0.55, 0.7), m(0.65, 0.9)]
    b = [m(0.62, 0.8), m(0.58, 0.7), m(0.66, 0.9)]
    r = [m(0.50, 0.6), m(0.52, 0.7), m(0.49, 0.6)]
    md, stats = seed_table(m(0.5, 0.6), {"grpo": g, "bupo": b, "random-reward": r})
    mean, lo, hi = paired_ci([x["avg"] - y["avg"] for x, y in zip(r, g, strict=True)])
    assert stats["avg"]["vs_grpo"]["random-reward"] == {"diff_mean": mean, "diff_ci": [lo, hi]}
    assert stats["avg"]["grpo"] == [0.60, 0.55, 0.65] and stats["avg"]["seeds"] == 3
    row = next(x for x in md.splitlines() if x.startswith("| avg |") and "random-reward" in x)
    assert "| 3 |" in row and f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" in row
    grpo_row = next(x for x in md.splitlines() if x.startswith("| avg |") and "GRPO" in x)
    assert grpo_row.endswith("| — | — |")
    assert "3 seeds per arm" in seeds_headline(3, ["grpo", "bupo"]) and "95% confidence" in seeds_headline(3, ["grpo"])


@pytest.mark.parametrize(("arms", "message"), [
    ("bupo", "must include grpo"), ("grpo,one-layer", "must include bupo"), ("grpo,bupo,ppo", "unknown arm"),
])
def test_bad_arms_are_one_line_errors(tmp_path, capsys, arms, message):
    assert cli_main(["reproduce", "--out", str(tmp_path), "--arms", arms]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_reproduce_trains_each_arm_per_seed_with_its_settings(tmp_path, monkeypatch):
    calls = []

    def fake_training(out_dir: Path, *, algo, seed, overrides=None, eval_before, **kw):
        calls.append((out_dir.name, algo, overrides or {}, eval_before))

    def fake_eval(run_dir: Path, *, first: bool):
        avg = 0.4 if first else 0.5 + 0.01 * len(run_dir.name)
        return {"benchmarks": {"bundled_test": {"avg": avg, "pass_at_k": {"4": avg + 0.1}}}}

    monkeypatch.setattr(reproduce, "run_analysis", lambda *a, **k: {"suggested_internal_layer": 6, "num_layers": 8})
    monkeypatch.setattr(reproduce, "run_training", fake_training)
    monkeypatch.setattr(reproduce, "eval_results", fake_eval)
    monkeypatch.setattr(reproduce, "probe_batch", lambda: None)
    monkeypatch.setattr(reproduce, "refinement_over_training", lambda *a, **k: [{"step": 0}])
    monkeypatch.setattr(reproduce, "refinement_figure", lambda curves, k, path: path)
    import bupo.analysis.report as analysis_report
    import bupo.experiments.report as report

    monkeypatch.setattr(analysis_report, "img_tag", lambda path: "<img>")

    monkeypatch.setattr(report, "write_report", lambda path, **kw: path)
    arms = ["grpo", "bupo", "layers-only", "one-layer", "random-reward"]
    res = reproduce.run_reproduce(tmp_path, seeds=2, ablations=False, arms=arms)
    assert [c[0] for c in calls] == [f"{a}-seed{s}" for s in range(2) for a in arms]
    by_name = {c[0]: c for c in calls}
    assert by_name["grpo-seed0"][3] is True and not any(c[3] for c in calls[1:])  # the base is evaluated once
    assert by_name["layers-only-seed1"][1:3] == ("bupo", {"internal_objective": "full"})
    assert by_name["one-layer-seed0"][1:3] == ("grpo", {"train_layer": 4})  # L // 2 of 8 layers
    assert by_name["random-reward-seed0"][1:3] == ("grpo", {"random_reward": 0.4})  # p = the base's Avg@K
    assert res["settings"]["random_reward_p"] == 0.4 and res["settings"]["arms"] == arms
    assert set(res["seed_study"]["avg"]["vs_grpo"]) == set(arms[1:]) and res["seed_study"]["avg"]["seeds"] == 2
