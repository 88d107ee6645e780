"""bupo.analysis without a model: the boundary rule, the streaming aggregation, figures, report, compare."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bupo.analysis.figures import make_figures, pool_columns, stride_rows
from bupo.analysis.report import render_report
from bupo.analysis.summary import Aggregator, boundary_details, boundary_layer, derive, required_columns

# ---------------------------------------------------------------------------------------------------------------
# the boundary rule


def qwen_like(rng, noise=0.15):
    """Qwen3-4B, paper Fig. 3: + for layers 1-6, ≈0 for 7-26, - for 27-36 (FFN axis about -10..+4)."""
    return np.r_[rng.uniform(1.0, 4.0, 6), rng.normal(0.0, noise, 20), rng.uniform(-9.0, -1.0, 10)]


def llama_like(rng, L=28):
    """Llama: FFN ΔH weakly positive at almost every layer, converging only at the last one (~50x smaller)."""
    return np.r_[rng.uniform(0.02, 0.2, L - 1), [-3.0]]


@pytest.mark.parametrize("seed", range(20))
def test_boundary_qwen_like_is_layer_6(seed):
    assert boundary_layer(qwen_like(np.random.default_rng(seed))) == 6


@pytest.mark.parametrize("seed", range(20))
def test_boundary_llama_like_is_penultimate(seed):
    m = llama_like(np.random.default_rng(seed))
    assert boundary_layer(m) == len(m) - 1


def test_boundary_bridges_dips_inside_a_positive_run_but_not_blips_after_a_plateau():
    # Llama with a few near-zero layers in the middle of its weakly positive run: still the penultimate layer
    m = np.r_[np.full(10, 0.1), [0.0, -0.01], np.full(10, 0.1), [-2.0]]
    assert boundary_layer(m) == 22
    # Qwen-like: one positive blip after a long ≈0 stretch does not move the boundary off the leading run
    m = np.r_[np.full(6, 3.0), np.zeros(10), [0.5], np.zeros(5), np.full(5, -4.0)]
    assert boundary_layer(m) == 6


def test_boundary_is_scale_invariant_and_independent_of_the_convergence_depth():
    rng = np.random.default_rng(0)
    m = qwen_like(rng)
    assert boundary_layer(m * 0.01) == boundary_layer(m) == boundary_layer(m * 50)
    m2 = m.copy()
    m2[-10:] *= 10  # a much stronger convergence stage does not change where exploration ends
    assert boundary_layer(m2) == 6


def test_boundary_edge_cases():
    with pytest.raises(ValueError, match="no exploration stage"):
        boundary_layer([-1.0, -2.0, -0.5])
    with pytest.raises(ValueError, match="no exploration stage"):
        boundary_layer([0.0, 0.0])
    d = boundary_details([-1.0, -2.0])
    assert d.layer is None and d.stages == ["-", "-"]
    assert boundary_layer([0.3, 0.2, 0.5, 0.1]) == 4  # all positive: no convergence stage -> L
    assert "no convergence stage" in boundary_details([0.3, 0.2]).note
    assert boundary_layer([1.0]) == 1
    assert boundary_layer([-1.0, 2.0, 2.0, -3.0]) == 3  # exploration need not start at layer 1
    # tol=0 reduces to the end of the leading positive mass; first maximum wins ties
    assert boundary_layer([1.0, 0.0, 0.0, -1.0], tol=0.0) == 1
    for bad in ([], [[1.0]], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            boundary_layer(bad)
    with pytest.raises(ValueError, match="tol"):
        boundary_layer([1.0], tol=1.5)


def test_boundary_on_pure_noise_is_a_valid_layer_or_none():
    for seed in range(10):
        m = np.random.default_rng(seed).normal(0, 1, 30)
        d = boundary_details(m)
        assert d.layer is None or 1 <= d.layer <= 30
        # the rule's definition, checked independently: first argmax of the prefix sums of m - tau
        tau = 0.1 * max(m.max(), 0)
        assert d.layer == int(np.argmax(np.cumsum(m - tau))) + 1


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def _fake_cols(rng, n, L, convention="bupo"):
    cols = {}
    for c in required_columns(L, convention):
        if c.startswith("top1."):
            cols[c] = rng.integers(0, 3, n).astype(np.int32)
        else:
            cols[c] = rng.uniform(0, 5, n).astype(np.float32)
    return cols


@pytest.mark.parametrize("convention", ["bupo", "residual"])
def test_aggregator_matches_direct_numpy(convention):
    rng = np.random.default_rng(0)
    L = 3
    samples = [_fake_cols(rng, n, L, convention) for n in (5, 17, 1, 9)]
    agg = Aggregator(L, convention)
    for s in samples:
        agg.add_sample(s)
    res = agg.result()
    cat = {c: np.concatenate([s[c] for s in samples]).astype(np.float64) for c in samples[0]}
    N = len(cat["H.final"])

    def H(stream, k):
        return cat[f"H.{stream}.{k}"]

    for k in range(L):
        pre = H("resid_pre", 0) if k == 0 else H("resid_post", k - 1)
        if convention == "bupo":
            d_attn, d_ffn = H("attn_out", k) - H("attn_in", k), H("mlp_out", k) - H("mlp_in", k)
        else:
            d_attn, d_ffn = H("resid_mid", k) - pre, H("resid_post", k) - H("resid_mid", k)
        d_layer = H("resid_post", k) - pre
        for key, x in (("attn_entropy_change", d_attn), ("ffn_entropy_change", d_ffn),
                       ("layer_entropy_change", d_layer), ("layer_entropy", H("resid_post", k)),
                       ("ffn_entropy", H("mlp_out", k))):
            assert res[key][k] == pytest.approx(x.mean(), abs=1e-12)
            assert res[f"{key}_se"][k] == pytest.approx(x.std(ddof=1) / np.sqrt(N), rel=1e-9)
            # cluster-robust SE by sample, from its textbook formula
            sums = np.array([x[a:b].sum() for a, b in _bounds([5, 17, 1, 9])])
            ns = np.array([5, 17, 1, 9])
            c = 4
            se_cl = np.sqrt(c / (c - 1) * ((sums - ns * x.mean()) ** 2).sum()) / N
            assert res[f"{key}_se_by_sample"][k] == pytest.approx(se_cl, rel=1e-9)
        agree = (cat[f"top1.resid_post.{k}"] == cat["top1.final"]).mean()
        assert res["layer_top1_agreement"][k] == pytest.approx(agree)
    assert res["final_entropy"] == pytest.approx(cat["H.final"].mean())
    assert agg.num_tokens == N and agg.num_samples == 4


def _bounds(ns):
    start = 0
    for n in ns:
        yield start, start + n
        start += n


def test_derive_rejects_missing_columns_and_aggregator_rejects_empty_samples():
    rng = np.random.default_rng(0)
    cols = _fake_cols(rng, 4, 2)
    del cols["H.mlp_in.1"]
    with pytest.raises(ValueError, match="H.mlp_in.1"):
        derive(cols, 2, "bupo")
    with pytest.raises(ValueError, match="unknown delta convention"):
        Aggregator(2, "nope")
    with pytest.raises(ValueError, match="no analysed tokens"):
        Aggregator(2).add_sample(_fake_cols(rng, 0, 2))


# ---------------------------------------------------------------------------------------------------------------
# figures, report


def test_stride_rows_always_keeps_the_last_layer():
    for n in range(1, 120):
        for mx in (1, 2, 5, 24, 48):
            idx = stride_rows(n, mx)
            assert idx[-1] == n - 1 and idx[0] == (0 if mx > 1 or n == 1 else n - 1)
            assert len(idx) <= mx and idx == sorted(set(idx))
    mat = np.arange(10.0).reshape(1, 10)
    pooled, w = pool_columns(mat, 4)
    assert w == 3 and pooled.tolist() == [[1.0, 4.0, 7.0, 9.0]]


def synthetic_summary(L: int, rng=None, num_samples: int = 10) -> dict:
    rng = rng or np.random.default_rng(0)
    post = np.linspace(11.0, 1.0, L)

    def lst(x):
        return [float(v) for v in x]

    s = {"model": "/models/fake", "projection": "raw", "delta_convention": "bupo", "num_layers": L,
         "num_samples": num_samples, "num_tokens": 1000, "vocab_size": 151936, "embed_entropy": 11.5,
         "final_entropy": 0.5, "final_logprob": -0.7, "layer_entropy": lst(post), "attn_entropy": lst(post * 0.8),
         "ffn_entropy": lst(post * 0.7), "layer_logprob": lst(-post), "layer_top1_agreement": lst(np.linspace(0, 1, L))}
    m = qwen_like(rng)[:L] if L <= 36 else rng.normal(0, 1, L)
    for key, val in (("attn_entropy_change", rng.normal(1, 1, L)), ("ffn_entropy_change", m),
                     ("layer_entropy_change", np.diff(np.r_[11.5, post]))):
        s[key] = lst(val)
        s[f"{key}_se"] = lst(np.full(L, 0.1))
        s[f"{key}_se_by_sample"] = lst(np.full(L, 0.3))
    s["layer_entropy_se"] = lst(np.full(L, 0.05))
    s["layer_entropy_se_by_sample"] = None
    d = boundary_details(s["ffn_entropy_change"])
    s["boundary_layer"] = d.layer
    s["suggested_internal_layer"] = None if d.layer is None else d.layer - 1
    s["boundary"] = {"rule": "r", "stages": d.stages, "note": d.note}
    return s


@pytest.mark.parametrize("L", [1, 2, 36, 80])
def test_figures_for_any_number_of_layers(tmp_path, L):
    s = synthetic_summary(L)
    heat = np.random.default_rng(1).uniform(0, 12, (L, 3000))
    figs = make_figures(s, tmp_path, heatmap=heat)
    assert set(figs) == {"entropy_flow", "entropy_change", "layer_entropy", "heatmap"}
    import matplotlib.image as mpimg

    for p in figs.values():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01  # not blank
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_report_is_self_contained(tmp_path):
    s = synthetic_summary(36)
    s.update(dtype="float32", template="chat", generation={"temperature": 1.0, "seed": 0})
    figs = make_figures(s, tmp_path, heatmap=np.ones((36, 10)))
    page = render_report(s, figs)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?!data:)", page)
    assert "http://" not in page and "https://" not in page
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 4
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "k = 5" in page and "l = 6" in page  # the suggested internal layer (0-based) and boundary
    for needle in ("/models/fake", "float32", "chat", "raw", "bupo", "temperature"):
        assert needle in page
    # a summary without a boundary renders its note
    s2 = synthetic_summary(3)
    s2.update(boundary_layer=None, suggested_internal_layer=None, boundary={"note": "no exploration stage", "stages": []})
    assert "no exploration stage" in render_report(s2, {})


def test_compare_overlays_runs_on_normalised_depth(tmp_path):
    from bupo.analysis.compare import compare

    dirs = []
    for name, L in (("qwen", 36), ("llama", 28)):
        d = tmp_path / name
        d.mkdir()
        s = synthetic_summary(L)
        if name == "llama":
            s["ffn_entropy_change"] = [float(v) for v in llama_like(np.random.default_rng(0), L)]
            s["boundary_layer"], s["suggested_internal_layer"] = L - 1, L - 2
        (d / "summary.json").write_text(json.dumps(s))
        dirs.append(d)
    res = compare(dirs, tmp_path / "cmp")
    assert [r["boundary_layer"] for r in res["runs"]] == [6, 27]
    assert res["runs"][0]["boundary_depth"] == pytest.approx(6 / 36)
    assert not res["mixed_settings"]
    for f in ("compare.png", "compare_normalized.png", "compare.json", "compare.html"):
        assert (tmp_path / "cmp" / f).stat().st_size > 500
    with pytest.raises(ValueError, match="no analysis summary"):
        compare([tmp_path / "missing"], tmp_path / "cmp2")


def test_atomic_path_replaces_on_success_and_leaves_the_target_on_failure(tmp_path):
    from bupo.io import atomic_path

    target = tmp_path / "sub" / "fig.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new"  # the old file survives a failed write
    assert [p.name for p in target.parent.iterdir()] == ["fig.png"]  # no temp file left behind


def test_a_failing_figure_leaves_no_file(tmp_path, monkeypatch):
    from bupo.analysis import figures

    def full(fig, fname, **kw):
        Path(fname).write_bytes(b"half a png")  # a writer that dies mid-file
        raise OSError("disk full")

    s = synthetic_summary(4)
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    with pytest.raises(OSError, match="disk full"):
        figures.plot_flow(s, tmp_path / "flow.png")
    assert list(tmp_path.iterdir()) == []


def test_cli_choices_are_the_library_values():
    from bupo.analysis import cli
    from bupo.analysis.summary import CONVENTION_STREAMS
    from bupo.internal.adapters import PROJECTIONS

    assert cli.PROJECTION_CHOICES == PROJECTIONS and tuple(CONVENTION_STREAMS) == cli.CONVENTIONS
