"""``bupo reproduce``: the paper's claims in miniature on the bundled model, reported as measured.

- Seed study: ``seeds`` x {GRPO, BuPO} with identical budgets; mean ± std per metric and a paired-difference
  95% confidence interval (Student t over seeds) of BuPO − GRPO. The sign is whatever was measured.
- Ablations (seed 0), mirroring the paper's Table 2 and Table 3:
  s_inter small / moderate / long (paper: moderate helps, long collapses) and k = boundary layer / middle /
  penultimate.
- Feature refinement (paper Fig. 5a/b/d), on checkpoints saved every few rollout steps of the seed-0 GRPO and
  BuPO runs and a fixed probe batch of held-out responses of the base model: mean cosine similarity between
  H^k and every higher layer's H^j; ΔH_Layer of layer k, H(pi^k) − H(pi^{k−1}); KL(pi^k || pi^j) for j > k.

Everything is resumable: a run whose ``bupo_run.json`` exists is not redone, metrics are cached per checkpoint.
Conventions: k is 0-based (paper layer k+1); entropies and KL in nats; projection ``raw``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from bupo.demo import _eval_results, run_analysis, run_training
from bupo.io import atomic_write_json

# two-sided 95% Student t quantiles, df = 1..30 (beyond: normal)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% confidence interval (Student t)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def _metrics(results: dict) -> dict[str, float]:
    """Avg@K and each Pass@K of one evaluation, averaged over its benchmarks (fractions)."""
    benches = list(results["benchmarks"].values())
    out = {"avg": statistics.fmean(b["avg"] for b in benches)}
    for k in sorted({int(k) for b in benches for k in b["pass_at_k"]}):
        vals = [b["pass_at_k"][str(k)] for b in benches if str(k) in b["pass_at_k"]]
        out[f"pass@{k}"] = statistics.fmean(vals)
    return out


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# feature refinement (Fig. 5a/b/d)


def probe_batch(n: int = 16, seed: int = 1234):
    """Held-out prompts + base-model responses as one padded batch with the response positions marked."""
    import torch

    from bupo.data.task import make_examples
    from bupo.data.templates import render_prompt
    from bupo.demo import _max_new_tokens
    from bupo.generation import generate
    from bupo.zoo import load_bundled

    model, tok = load_bundled()
    rows = make_examples("test", n, seed=seed)
    prompts = [render_prompt(tok, r["prompt"], "chat") for r in rows]
    comps = generate(model, tok, prompts, n=1, max_new_tokens=_max_new_tokens(), temperature=1.0, seed=seed)
    seqs, resp = [], []
    for prompt, c in zip(prompts, comps, strict=True):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = list(c[0].token_ids)
        seqs.append(p_ids + r_ids)
        resp.append((len(p_ids), len(r_ids)))
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, (lp, lr)) in enumerate(zip(seqs, resp, strict=True)):
        off = width - len(s)  # left padding
        ids[i, off:] = torch.tensor(s)
        mask[i, off:] = 1
        positions[i, off + lp - 1: off + lp + lr - 1] = True  # positions that predict response tokens
    return ids, mask, positions


def refinement_metrics(model, ids, mask, positions, k: int, chunk_size: int = 512) -> dict:
    """cos(H^k, H^j), KL(pi^k || pi^j) for j > k, and ΔH_Layer of layer k, averaged over the probe positions."""
    import torch

    from bupo.internal import Projector, capture_streams, parts

    p = parts(model)
    with torch.no_grad(), capture_streams(model, streams=["resid_pre", "resid_post"], positions=positions) as st:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    proj = Projector(model, "raw")

    def logp(h):
        return torch.log_softmax(proj.logits(h).float(), -1)

    hk = st[("resid_post", k)]
    lk = logp(hk)
    h_prev = st[("resid_pre", k)]  # H^{k-1} (the embedding output for k = 0)
    out = {"cos": {}, "kl": {}}
    for j in range(k + 1, p.num_layers):
        hj = st[("resid_post", j)]
        out["cos"][j] = torch.nn.functional.cosine_similarity(hk, hj, dim=-1).mean().item()
        lj = logp(hj)
        out["kl"][j] = (lk.exp() * (lk - lj)).sum(-1).mean().item()
    def ent(lp):
        return -(lp.exp() * lp).sum(-1).mean().item()

    out["delta_h_layer_k"] = ent(lk) - ent(logp(h_prev))
    out["entropy_k"] = ent(lk)
    return out


def refinement_over_training(run_dir: Path, k: int, probe) -> list[dict]:
    """Metrics for the base model and each checkpoint of a run (cached in ``refinement.json``)."""
    from transformers import AutoModelForCausalLM

    from bupo.zoo import DEFAULT_MODEL

    cache = run_dir / "refinement.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    points = [(0, DEFAULT_MODEL)] + sorted(
        (int(c.name.split("-")[1]), str(c)) for c in run_dir.glob("checkpoint-*") if c.is_dir())
    rows = []
    for step, path in points:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        rows.append({"step": step, **refinement_metrics(model, *probe, k=k)})
    atomic_write_json(cache, rows)
    return rows


def refinement_figure(curves: dict[str, list[dict]], k: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for label, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [statistics.fmean(r["cos"].values()) for r in rows], marker="o", label=label)
        axes[1].plot(steps, [r["delta_h_layer_k"] for r in rows], marker="o", label=label)
        axes[2].plot(steps, [statistics.fmean(r["kl"].values()) for r in rows], marker="o", label=label)
    axes[0].set_title(f"mean cos(H^{k + 1}, H^j), j > {k + 1} (Fig. 5a)", fontsize=9)
    axes[1].set_title(f"ΔH of layer {k + 1} = H(pi^{k + 1}) − H(pi^{k}) (Fig. 5b)", fontsize=9)
    axes[2].set_title(f"mean KL(pi^{k + 1} || pi^j), j > {k + 1} (Fig. 5d)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------


def run_reproduce(out: Path, *, seeds: int = 5, rollout_steps: int = 16, internal_steps: int = 4,
                  eval_problems: int = 100, eval_samples: int = 8, ablations: bool = True) -> dict:
    from bupo.demo_report import markdown_table_to_html, write_report
    from bupo.internal import parts
    from bupo.zoo import load_bundled

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    summary = run_analysis(out / "analysis", samples=48, seed=0)
    k = int(summary["suggested_internal_layer"])
    num_layers = parts(load_bundled()[0]).num_layers
    common = dict(rollout_steps=rollout_steps, eval_problems=eval_problems, eval_samples=eval_samples)

    def train(name, algo, seed, s_inter=internal_steps, layer=k, save_every=0):
        print(f"== {name}")
        run_training(out / "runs" / name, algo=algo, seed=seed, internal_steps=s_inter, internal_layer=layer,
                     eval_before=False, save_every=save_every, **common)
        return _metrics(_eval_results(out / "runs" / name, first=False))

    # base model: one evaluation (step 0 of the first GRPO run)
    per_seed = {"grpo": [], "bupo": []}
    for seed in range(seeds):
        for algo in ("grpo", "bupo"):
            save_every = max(1, rollout_steps // 4) if seed == 0 else 0
            name = f"{algo}-seed{seed}"
            print(f"== {name}")
            run_training(out / "runs" / name, algo=algo, seed=seed, internal_steps=internal_steps,
                         internal_layer=k, eval_before=(seed == 0 and algo == "grpo"), save_every=save_every,
                         **common)
            per_seed[algo].append(_metrics(_eval_results(out / "runs" / name, first=False)))
    base = _metrics(_eval_results(out / "runs" / "grpo-seed0", first=True))

    keys = list(base)
    rows = ["| metric | base | GRPO mean ± std | BuPO mean ± std | BuPO − GRPO (paired) | 95% CI |",
            "|---|---|---|---|---|---|"]
    stats = {}
    for key in keys:
        g = [m[key] for m in per_seed["grpo"]]
        b = [m[key] for m in per_seed["bupo"]]
        mean, lo, hi = paired_ci([bi - gi for bi, gi in zip(b, g, strict=True)])
        stats[key] = {"base": base[key], "grpo": g, "bupo": b, "diff_mean": mean, "diff_ci": [lo, hi]}
        rows.append(f"| {key} | {100 * base[key]:.2f} | {100 * statistics.fmean(g):.2f} ± {100 * _sd(g):.2f} | "
                    f"{100 * statistics.fmean(b):.2f} ± {100 * _sd(b):.2f} | {100 * mean:+.2f} | "
                    f"[{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    seed_table = "\n".join(rows)

    abl_rows = []
    ablation_results = {}
    if ablations:
        moderate = per_seed["bupo"][0]
        s_small, s_long = max(1, internal_steps // 4), min(rollout_steps, 3 * internal_steps)
        ablation_results["s_inter"] = {
            f"small (s_inter={s_small})": train(f"bupo-sinter{s_small}", "bupo", 0, s_inter=s_small),
            f"moderate (s_inter={internal_steps})": moderate,
            f"long (s_inter={s_long})": train(f"bupo-sinter{s_long}", "bupo", 0, s_inter=s_long),
        }
        middle, penult = num_layers // 2 - 1, num_layers - 2
        ablation_results["k"] = {f"boundary (k={k}, l={k + 1})": moderate}
        for label, layer in (("middle", middle), ("penultimate", penult)):
            if layer != k:
                ablation_results["k"][f"{label} (k={layer}, l={layer + 1})"] = train(f"bupo-k{layer}", "bupo", 0,
                                                                                   layer=layer)
        abl_rows = ["| ablation | setting | Avg@K (%) | " + " | ".join(
            f"{m} (%)" for m in keys if m != "avg") + " |", "|---|---|---|" + "---|" * (len(keys) - 1)]
        abl_rows.append("| — | GRPO (seed 0) | " + " | ".join(f"{100 * per_seed['grpo'][0][m]:.2f}" for m in keys)
                        + " |")
        for what, settings in ablation_results.items():
            for label, m in settings.items():
                abl_rows.append(f"| {what} | {label} | " + " | ".join(f"{100 * m[x]:.2f}" for x in keys) + " |")

    print("== feature refinement")
    probe = probe_batch()
    curves = {label: refinement_over_training(out / "runs" / name, k, probe)
              for label, name in (("GRPO", "grpo-seed0"), ("BuPO", "bupo-seed0"))}
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    fig = refinement_figure(curves, k, fig_dir / "refinement.png")

    from bupo.analysis.report import img_tag

    settings = {"seeds": seeds, "rollout_steps": rollout_steps, "internal_steps": internal_steps,
                "internal_layer": k, "internal_layer_paper": k + 1, "eval_problems": eval_problems,
                "eval_samples": eval_samples, "wall_seconds": round(time.time() - t0, 1)}
    results = {"settings": settings, "seed_study": stats, "ablations": ablation_results, "refinement": curves}
    atomic_write_json(out / "results.json", results)
    sections = [("Ablations (seed 0)", markdown_table_to_html("\n".join(abl_rows)) if abl_rows else "<p>skipped</p>"),
                ("Feature refinement (seed 0)", img_tag(fig))]
    table = (f"Seed study: {seeds} seeds, Avg@{eval_samples} / Pass@K over {eval_problems} held-out problems, "
             "in %. CI: paired Student t over seeds.\n\n" + seed_table)
    report = write_report(out / "report.html", title="bupo reproduce: BuPO vs GRPO in miniature",
                          analysis_dir=out / "analysis",
                          runs={"GRPO": out / "runs" / "grpo-seed0", "BuPO": out / "runs" / "bupo-seed0"},
                          table_md=table, settings=settings, extra_sections=sections)
    print(table)
    if abl_rows:
        print("\n" + "\n".join(abl_rows))
    print(f"\nreport: {report}   ({settings['wall_seconds']:.0f} s)")
    return results
