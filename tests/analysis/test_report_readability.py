"""Reports people want to read: maths rendered as HTML, one box per answer, axes that hold their data, a colour
scale that shows the spread, comparable probe panels, an honest demo headline and a Pass@K curve with its K."""

from __future__ import annotations

import re

import numpy as np
import pytest

import bupo.plotting as plotting
from bupo.analysis import figures
from bupo.analysis.report import math_html, render_report
from bupo.evaluation.report import curve_ks, pass_at_k_curve, pass_at_k_figure

L = 4


def _summary(**over) -> dict:
    s = {"model": "toy", "num_layers": L, "projection": "raw", "delta_convention": "output_minus_input",
         "vocab_size": 50, "num_samples": 2, "num_tokens": 20, "embed_entropy": 3.0, "final_entropy": 1.0,
         "final_logprob": -1.0, "layer_entropy": [3.1, 3.3, 2.0, 1.1], "attn_entropy": [3.05, 3.2, 2.5, 1.5],
         "ffn_entropy": [3.1, 3.3, 2.0, 1.1], "layer_logprob": [-3.0] * L, "layer_top1_agreement": [0.5] * L,
         "boundary_layer": 2, "suggested_internal_layer": 1, "boundary": {"rule": "ΔH_FFN of π^l > 0", "stages": []}}
    for key in ("layer", "attn", "ffn"):
        s[f"{key}_entropy_change"] = [0.1, -0.2, -1.5, -0.9]
        s[f"{key}_entropy_change_se"] = [0.3, 0.05, 0.4, 0.2]
    s.update(over)
    return s


@pytest.fixture
def saved(monkeypatch):
    """Every matplotlib figure the report code saves, before it is closed."""
    figs = []
    real = plotting.save_figure

    def keep(fig, path):
        figs.append(fig)
        return real(fig, path)

    import bupo.experiments.report

    monkeypatch.setattr(figures, "save_figure", keep)
    monkeypatch.setattr(plotting, "save_figure", keep)
    monkeypatch.setattr(bupo.experiments.report, "save_figure", keep)
    return figs


def test_maths_is_written_as_html_super_and_subscripts():
    assert math_html("π^k and π^{l+1}") == "π<sup>k</sup> and π<sup>l+1</sup>"
    assert math_html("H(A^l), π_θ, πθ") == "H(A<sup>l</sup>), π<sub>θ</sub>, π<sub>θ</sub>"
    assert math_html("ΔH_FFN^l > 0") == "ΔH<sub>FFN</sub><sup>l</sup> &gt; 0"
    assert math_html("a < b & c") == "a &lt; b &amp; c"  # still escaped


def test_analysis_report_renders_maths_and_needs_nothing_from_the_network():
    page = render_report(_summary(), {})
    assert "π<sub>θ</sub>" in page and "H<sup>0</sup>" in page and "π<sup>l</sup>" in page
    assert "πθ" not in page and "H^0" not in page and "π^l" not in page
    assert not re.search(r"<script[^>]+src=|<link |https?://", page)


def test_a_degenerate_projection_without_a_boundary_is_said_once_in_one_box():
    msg = "the residual RMS is 400x the final norm's gain at every layer"
    s = _summary(boundary_layer=None, suggested_internal_layer=None,
                 projection_health={"degenerate": True, "message": msg, "advice": "use --projection final_norm"},
                 boundary={"rule": "r", "note": f"no usable boundary: {msg}", "options": ["--algo grpo"]})
    page = render_report(s, {})
    assert page.count(msg) == 1 and page.count('class="k"') == 1
    assert "No boundary layer. Degenerate projection" in page and "--algo grpo" in page
    healthy = render_report(_summary(boundary_layer=None, suggested_internal_layer=None,
                                     boundary={"rule": "r", "note": "ΔH_FFN never turns negative"}), {})
    assert "No boundary layer: ΔH<sub>FFN</sub> never turns negative" in healthy and "#fdecea" not in healthy


def test_entropy_change_axes_hold_every_bar_and_error_bar(tmp_path, saved):
    figures.plot_delta_bars(_summary(), tmp_path / "d.png")
    (fig,) = saved
    y, se = np.array([0.1, -0.2, -1.5, -0.9]), np.array([0.3, 0.05, 0.4, 0.2])
    hw, _ = figures.ci_halfwidth(_summary(), "ffn_entropy_change")
    assert np.allclose(hw, 1.96 * se)
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo < (y - 1.96 * se).min() and hi > (y + 1.96 * se).max() and lo < 0 < hi


def test_heatmap_colour_scale_spans_robust_percentiles_in_nats(tmp_path, saved):
    rng = np.random.default_rng(0)
    m = 2.0 + 0.1 * rng.standard_normal((L, 200))
    m[0, 0] = 10.8  # one extreme token must not flatten the rest into one colour
    figures.plot_heatmap(m, tmp_path / "h.png", summary=_summary())
    (fig,) = saved
    image = fig.axes[0].images[0]
    lo, hi = image.get_clim()
    assert 1.6 < lo < 2.0 < hi < 2.4
    assert "nats" in fig.axes[1].get_ylabel()
    assert figures.robust_range(np.full((2, 3), 1.5)) == (1.0, 2.0)  # flat input: still a visible scale


def test_probe_panels_of_grpo_and_bupo_share_their_y_range(tmp_path, saved):
    from bupo.experiments.report import layer_probe_curves

    logs = {"GRPO": [{"step": 1, "bupo/layer_entropy/L0": 1.0, "bupo/layer_entropy/final": 0.5}],
            "BuPO": [{"step": 1, "bupo/layer_entropy/L0": 6.0, "bupo/layer_entropy/final": 3.0}]}
    layer_probe_curves(logs, tmp_path / "p.png")
    (fig,) = saved
    a, b = fig.axes[:2]
    assert a.get_ylim() == b.get_ylim()
    assert a.get_legend_handles_labels()[1] == [r"$\pi^{1}$", r"$\pi_\theta$"]


def test_pass_at_k_curve_has_every_power_of_two_up_to_n_and_n():
    assert curve_ks(8) == [1, 2, 4, 8] and curve_ks(6) == [1, 2, 4, 6] and curve_ks(1) == [1]
    bench = {"n": 8, "avg": 0.3125, "pass_at_k": {"1": 0.3125, "4": 0.6}, "correct_counts": [2, 0, 8, 0]}
    curve = pass_at_k_curve(bench)
    assert sorted(curve) == [1, 2, 4, 8] and curve[1] == pytest.approx(10 / 32) and curve[8] == pytest.approx(0.5)
    assert curve[4] == pytest.approx((1 - 15 / 70 + 0 + 1 + 0) / 4)  # unbiased: 1 - C(n-c, k) / C(n, k)
    old = {"n": 8, "pass_at_k": {"1": 0.25, "4": 0.6}}  # results from before correct_counts: what they recorded
    assert pass_at_k_curve(old) == {1: 0.25, 4: 0.6}


def test_pass_at_k_figure_draws_k_8_for_n_8(tmp_path, saved):
    res = {"benchmarks": {"bundled_test": {"n": 8, "avg": 0.25, "pass_at_k": {"1": 0.25, "4": 0.6},
                                           "correct_counts": [2, 0, 8, 0]}}}
    pass_at_k_figure([("base", res)], tmp_path / "k.png")
    (fig,) = saved
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1, 2, 4, 8]


def test_demo_headline_states_one_seed_and_points_to_reproduce(tmp_path):
    from bupo.experiments.demo import headline
    from bupo.experiments.report import write_report

    def res(v):
        return {"benchmarks": {"bundled_test": {"avg": v, "n": 8, "pass_at_k": {"1": v}}}}

    line = headline({"GRPO": res(0.64), "BuPO": res(0.60625)}, seed=0, eval_samples=8)
    assert line.startswith("One seed (seed 0): GRPO 64.00 vs BuPO 60.62 Avg@8")
    assert "bupo reproduce" in line and "interval" in line
    page = write_report(tmp_path / "r.html", title="t", analysis_dir=None, runs={}, table_md="| a |",
                        settings={}, headline=line).read_text()
    assert page.index("One seed") < page.index("<h2>Results</h2>")


def test_lens_grid_is_layer_by_position_with_hover_details_and_no_network():
    from bupo.analysis.report import lens_grid_html

    def cell(h, tok):
        return {"entropy": h, "top": [[tok, 0.9], [" x", 3e-05]]}

    lens = {"projections": ["raw"], "positions": [
        {"position": p, "context": "ctx", "next_token": "n",
         "layers": [{"layer": k, "paper_layer": k + 1, "raw": cell(0.5 * k, f"t{k}{p}")} for k in range(3)]}
        for p in (4, 9)]}
    page = lens_grid_html(lens)
    rows = re.findall(r"<tr><th>(\d+)</th>", page)
    assert rows == ["3", "2", "1"]  # deepest layer on top
    assert page.count("<td ") == 6 and "&#x27;t29&#x27;" in page
    assert "layer l = 3 (k = 2), position 9\nH = 1.000 nats\n&#x27;t29&#x27;: 0.90\n&#x27; x&#x27;: 3.0e-05" in page
    assert "<script>" in page and not re.search(r"src=|https?://", page)
