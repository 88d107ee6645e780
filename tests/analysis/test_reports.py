"""Eval and demo reports: the Pass@K curve (paper Fig. 6), legible training curves, relative links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bupo.plotting as plotting
from bupo.cli import main
from bupo.evaluation.report import add_pass_at_k_curve, pass_at_k_figure

SETTINGS = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "max_new_tokens": 64, "template": "chat",
            "reward": "boxed_exact", "seed": 0, "backend": "hf"}


def _results(label: str, passk: dict[int, float], name: str = "aime_2024") -> dict:
    bench = {"avg": passk[1], "n": max(passk), "problems": 30, "truncated": 0.0,
             "pass_at_k": {str(k): v for k, v in passk.items()}}
    return {"label": label, "settings": SETTINGS, "benchmarks": {name: bench, "bundled_test": dict(bench)}}


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib figures the report functions save (inspected before they are closed)."""
    figs = []
    real = plotting.save_figure

    def keep(fig, path):
        figs.append([(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale(),
                      [(list(line.get_xdata()), list(line.get_ydata()), line.get_label()) for line in ax.lines],
                      [p.get_x() + p.get_width() for p in ax.patches])
                     for ax in fig.axes if ax.get_visible()])
        return real(fig, path)

    import bupo.experiments.report

    monkeypatch.setattr(plotting, "save_figure", keep)
    monkeypatch.setattr(bupo.experiments.report, "save_figure", keep)  # imported there by name
    return figs


def test_pass_at_k_figure_plots_every_run_per_benchmark_in_percent(tmp_path, captured):
    runs = [("base", _results("base", {1: 0.2, 4: 0.5, 16: 0.8})), ("BuPO", _results("BuPO", {1: 0.3, 4: 0.6, 16: 0.9}))]
    assert pass_at_k_figure(runs, tmp_path / "p.png") == tmp_path / "p.png" and (tmp_path / "p.png").stat().st_size
    (axes,) = captured
    assert [a[0] for a in axes] == ["AIME24 (n = 16)", "bundled_test (n = 16)"]  # Table 1 order, then others
    title, xlabel, ylabel, xscale, lines, _ = axes[0]
    assert xscale == "log" and ylabel == "Pass@K (%)" and xlabel.startswith("K")
    assert lines == [([1, 4, 16], [20.0, 50.0, 80.0], "base"), ([1, 4, 16], [30.0, 60.0, 90.0], "BuPO")]
    assert pass_at_k_figure([("x", {"benchmarks": {"a": {"pass_at_k": {}}}})], tmp_path / "none.png") is None


def test_eval_folder_gets_the_curve_linked_from_table_md(tmp_path):
    res = _results("mine", {1: 0.25, 2: 0.5})
    fig = add_pass_at_k_curve(tmp_path, res)
    assert fig == tmp_path / "pass_at_k.png" and fig.is_file()
    table = (tmp_path / "table.md").read_text()
    assert "![Pass@K curve](pass_at_k.png)" in table and "| mine |" in table


def test_eval_compare_out_writes_curves_next_to_the_markdown(tmp_path, capsys):
    for name, v in (("a", 0.1), ("b", 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(name, {1: v, 4: 2 * v})))
    md = tmp_path / "cmp" / "table.md"
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(md)]) == 0
    assert (tmp_path / "cmp" / "table_pass_at_k.png").is_file()
    assert "![Pass@K curves](table_pass_at_k.png)" in md.read_text()
    assert "table_pass_at_k" not in capsys.readouterr().out  # the printed table has no dangling link


def _fake_run(run: Path, *, internal_steps: int, per: int, reward: list[float], accuracy: list[float]) -> None:
    run.mkdir(parents=True)
    log = [{"step": i + 1, "reward": r, "bupo/accuracy": a, "bupo/entropy_full": 1.0 + i,
            "bupo/entropy_internal": 2.0 + i, "bupo/phase": float(i + 1 <= internal_steps * per)}
           for i, (r, a) in enumerate(zip(reward, accuracy, strict=True))]
    (run / "log_history.json").write_text(json.dumps(log))
    (run / "bupo_run.json").write_text(json.dumps({"optimizer_steps_per_rollout": per,
                                                    "internal_steps": internal_steps}))
    (run / "README.md").write_text("card")
    for step, v in ((0, 0.2), (len(reward), 0.5 + internal_steps / 10)):
        d = run / "evals" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_results(run.name, {1: v, 4: min(1.0, 2 * v)})))


def test_demo_report_curves_links_and_pass_at_k(tmp_path, captured):
    from bupo.experiments.report import write_report

    out = tmp_path / "demo"
    _fake_run(out / "grpo", internal_steps=0, per=2, reward=[0.1, 0.2, 0.3, 0.4], accuracy=[0.1, 0.2, 0.3, 0.4])
    _fake_run(out / "bupo", internal_steps=1, per=2, reward=[0.1, 0.3, 0.3, 0.5], accuracy=[0.1, 0.3, 0.3, 0.5])
    (out / "analysis").mkdir()
    (out / "analysis" / "report.html").write_text("<html></html>")
    summary = {"boundary_layer": 7, "suggested_internal_layer": 6, "num_samples": 4, "num_tokens": 40}
    report = write_report(out / "report.html", title="t", analysis_dir=out / "analysis",
                          runs={"GRPO": out / "grpo", "BuPO": out / "bupo"}, table_md="| a |\n|---|\n| 1 |",
                          settings={}, summary=summary)
    page = report.read_text()
    assert str(tmp_path) not in page  # no absolute paths: the folder can be moved
    assert '<a href="analysis/report.html">' in page and '<a href="grpo">' in page
    assert '<a href="bupo/README.md">model card</a>' in page
    passk, curves = captured[0], captured[1]
    assert [line[2] for line in passk[0][4]] == ["base", "GRPO", "BuPO"]  # base = the step-0 evaluation
    # reward == accuracy (a 0/1 reward): one panel, not two; x in rollout steps; every panel has a y label
    assert [a[0] for a in curves] == ["mean reward of the rollouts (= accuracy: a 0/1 reward)",
                                      r"entropy of the full policy $\pi_\theta$", r"entropy of the internal policy $\pi^k$", ""]
    assert curves[3][4] == []  # the spare slot holds only the legend
    assert all(a[1] == "rollout step" and a[2] for a in curves[:3])
    xs, ys, _ = next(line for line in curves[0][4] if line[2] == "BuPO")
    assert xs == [0.5, 1.0, 1.5, 2.0] and ys == [0.1, 0.3, 0.3, 0.5]
    assert curves[0][5] == [1.0]  # the internal phase shaded up to s_inter = 1 rollout step (BuPO only)


def test_accuracy_panel_stays_when_it_differs_from_the_reward(tmp_path, captured):
    from bupo.experiments.report import read_logs, training_curves

    _fake_run(tmp_path / "r", internal_steps=0, per=1, reward=[0.5, 0.7], accuracy=[0.0, 1.0])
    runs = {"run": tmp_path / "r"}
    training_curves(read_logs(runs), tmp_path / "c.png", runs)
    assert "rollout accuracy" in [a[0] for a in captured[0]]
