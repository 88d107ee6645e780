"""``bupo reproduce``: the paper's claims in miniature on the bundled model, reported as measured.

- Seed study: ``seeds`` x {GRPO, BuPO} with identical budgets; mean ± std per metric and a paired-difference
  95% confidence interval (Student t over seeds) of BuPO − GRPO. The sign is whatever was measured.
- Ablations (seed 0), mirroring the paper's Table 2 and Table 3:
  s_inter small / moderate / long (paper: moderate helps, long collapses) and k = boundary layer / middle /
  penultimate.
- Feature refinement (paper Fig. 5a/b/d), on checkpoints saved every few rollout steps of the seed-0 GRPO and
  BuPO runs and a fixed probe batch of held-out responses of the base model: mean cosine similarity between
  H^k and every higher layer's H^j; ΔH_Layer of layer k, H(pi^k) − H(pi^{k−1}); KL(pi^k || pi^j) for j > k.

With ``--model DIR`` (a real pretrained checkpoint, e.g. SmolLM2-135M-Instruct): :func:`run_real_model`, the
smallest honest GRPO vs BuPO experiment on that model (see its docstring; docs/real-models.md has the measured table).

Everything is resumable: a run whose ``bupo_run.json`` exists is not redone, metrics are cached per checkpoint.
Conventions: k is 0-based (paper layer k+1); entropies and KL in nats; projection ``raw`` on the bundled model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bupo.experiments.steps import (
    THREADS_HELP,
    bundled_max_new_tokens,
    check_positive,
    eval_results,
    metrics,
    run_analysis,
    run_training,
    set_threads,
)
from bupo.io import atomic_write_json


def register(subparsers: Any) -> None:
    r = subparsers.add_parser(
        "reproduce", help="seeds x {GRPO, BuPO}, s_inter and k ablations, feature refinement; resumable",
        description="The paper's claims in miniature on the bundled model, or with --model DIR a small GRPO vs "
                    "BuPO run on a real checkpoint (see bupo.experiments.reproduce).",
    )
    r.add_argument("--out", default="reproduce", help="output folder (default: reproduce)")
    r.add_argument("--model", default=None,
                   help="a real checkpoint (bupo name such as smollm2-135m-instruct, folder or Hub id): run the real-model experiment (arithmetic in words, "
                        "final_number reward) instead of the bundled-model study")
    r.add_argument("--seeds", type=int, default=None, help="seeds per algorithm (default 5; 1 with --model)")
    r.add_argument("--rollout-steps", type=int, default=None, help="default 16 (8 with --model)")
    r.add_argument("--internal-steps", type=int, default=None,
                   help="s_inter in rollout steps: the 'moderate' one (default 4; with --model a quarter of "
                        "--rollout-steps)")
    r.add_argument("--eval-limit", "--eval-problems", dest="eval_problems", type=int, default=None, metavar="N",
                   help="held-out problems evaluated (default 100; 32 with --model)")
    r.add_argument("--eval-samples", type=int, default=None, help="default 8 (4 with --model)")
    r.add_argument("--no-ablations", action="store_true", help="only the seed study")
    r.add_argument("--internal-layer", type=int, default=None,
                   help="--model: 0-based k (paper layer k+1); default: the analysis' suggestion, an error when "
                        "it has none")
    r.add_argument("--projection", default="final_norm",
                   help="--model: BuPO internal projection(s), comma-separated raw,final_norm (default final_norm)")
    r.add_argument("--analysis", default=None,
                   help="--model: a finished analysis (summary.json or its folder) to take k from; default: a short "
                        "analysis into <out>/analysis")
    r.add_argument("--difficulty", type=int, default=REAL_DEFAULTS["difficulty"],
                   help=f"--model: operations per arithmetic problem (default {REAL_DEFAULTS['difficulty']})")
    r.add_argument("--learning-rate", type=float, default=REAL_DEFAULTS["learning_rate"],
                   help=f"--model: learning rate (default {REAL_DEFAULTS['learning_rate']})")
    r.add_argument("--max-completion-length", type=int, default=REAL_DEFAULTS["max_completion_length"],
                   help=f"--model: tokens per completion (default {REAL_DEFAULTS['max_completion_length']})")
    r.add_argument("--completions", type=int, default=32,
                   help="--model: completions per rollout step, 8 per prompt, a multiple of 16 (default 32)")
    r.add_argument("--temperature", type=float, default=REAL_DEFAULTS["temperature"],
                   help=f"--model: sampling temperature of rollouts and evaluations (default "
                        f"{REAL_DEFAULTS['temperature']}: measured to give more reward signal than 1.0 on SmolLM2)")
    r.add_argument("--auto-cap", type=int, default=None,
                   help="--model: also a BuPO run per seed with --internal-steps auto capped at this many rollout "
                        "steps (the adaptive switch), after the fixed runs (default: none)")
    r.add_argument("--auto-seeds", type=int, default=None,
                   help="--model: the --auto-cap runs for the first N seeds only (default: every seed)")
    r.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    r.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    real = args.model is not None
    for name, bundled, small in (("seeds", 5, 1), ("rollout_steps", 16, 8), ("eval_problems", 100, 32),
                                 ("eval_samples", 8, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if real else bundled)
    if args.internal_steps is None:
        args.internal_steps = max(1, args.rollout_steps // 4) if real else 4
    check_positive(args, "seeds", "rollout_steps", "eval_problems", "eval_samples")
    set_threads(args.threads)
    if real:
        projections = [p.strip() for p in args.projection.split(",") if p.strip()]
        run_real_model(Path(args.out), model=args.model, seeds=args.seeds, rollout_steps=args.rollout_steps,
                       internal_steps=args.internal_steps, internal_layer=args.internal_layer,
                       projections=projections, analysis=args.analysis, difficulty=args.difficulty,
                       eval_problems=args.eval_problems, eval_samples=args.eval_samples,
                       learning_rate=args.learning_rate, max_completion_length=args.max_completion_length,
                       completions_per_rollout=args.completions, temperature=args.temperature,
                       auto_cap=args.auto_cap, auto_seeds=args.auto_seeds)
        return 0
    run_reproduce(Path(args.out), seeds=args.seeds, rollout_steps=args.rollout_steps,
                  internal_steps=args.internal_steps, eval_problems=args.eval_problems,
                  eval_samples=args.eval_samples, ablations=not args.no_ablations)
    return 0



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


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# feature refinement (Fig. 5a/b/d)


def probe_batch(n: int = 16, seed: int = 1234):
    """Held-out prompts + base-model responses as one padded batch with the response positions marked."""
    import torch

    from bupo.analysis.run import generate_traces, traces_from_generated
    from bupo.data.task import make_examples
    from bupo.zoo import load_bundled

    model, tok = load_bundled()
    rows = make_examples("test", n, seed=seed)
    gen = generate_traces(model, tok, rows, template="chat", max_new_tokens=bundled_max_new_tokens(), temperature=1.0,
                          top_p=1.0, seed=seed)
    traces = traces_from_generated(tok, gen)
    seqs = [t.prompt_ids + t.response_ids for t in traces]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, t) in enumerate(zip(seqs, traces, strict=True)):
        # left padding as before; measure_batch's right padding would shift the rotary positions of the
        # plain forward below and so change the numbers
        off = width - len(s)
        lp, lr = len(t.prompt_ids), len(t.response_ids)
        ids[i, off:] = torch.tensor(s)
        mask[i, off:] = 1
        positions[i, off + lp - 1: off + lp + lr - 1] = True  # positions that predict response tokens
    return ids, mask, positions


def refinement_metrics(model, ids, mask, positions, k: int) -> dict:
    """cos(H^k, H^j), KL(pi^k || pi^j) for j > k, and ΔH_Layer of layer k, averaged over the probe positions."""
    import torch

    from bupo.internal import Projector, capture_streams, parts

    p = parts(model)
    with torch.no_grad(), capture_streams(model, streams=["resid_pre", "resid_post"], positions=positions) as st:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    proj = Projector(model, "raw")

    def logp(h):
        return torch.log_softmax(proj.logits(h).float(), -1)

    def ent(lp, probs):
        return -(probs * lp).sum(-1).mean().item()

    hk = st[("resid_post", k)]
    lk = logp(hk)
    pk = lk.exp()
    h_prev = st[("resid_pre", k)]  # H^{k-1} (the embedding output for k = 0)
    out = {"cos": {}, "kl": {}}
    for j in range(k + 1, p.num_layers):
        hj = st[("resid_post", j)]
        out["cos"][j] = torch.nn.functional.cosine_similarity(hk, hj, dim=-1).mean().item()
        lj = logp(hj)
        out["kl"][j] = (pk * (lk - lj)).sum(-1).mean().item()
    lp_prev = logp(h_prev)
    h_k = ent(lk, pk)
    out["delta_h_layer_k"] = h_k - ent(lp_prev, lp_prev.exp())
    out["entropy_k"] = h_k
    return out


def refinement_point(model_dir: str | Path, k: int, probe) -> dict:
    """:func:`refinement_metrics` of the model saved in ``model_dir`` on the probe batch."""
    from bupo.models import load_model

    model, _ = load_model(model_dir, dtype="float32", device="cpu", tokenizer=False)  # on the probe's device
    return refinement_metrics(model, *probe, k=k)


def refinement_over_training(run_dir: Path, k: int, probe, base: dict | None = None) -> list[dict]:
    """Metrics for the base model and each checkpoint of a run (cached in ``refinement.json``).

    ``base``: the base model's row (step 0) when it was already measured for another run on the same probe;
    measured here otherwise.
    """
    from bupo.zoo import DEFAULT_MODEL

    cache = run_dir / "refinement.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = [base if base is not None else {"step": 0, **refinement_point(DEFAULT_MODEL, k, probe)}]
    for step, path in sorted((int(c.name.split("-")[1]), str(c)) for c in run_dir.glob("checkpoint-*")
                             if c.is_dir()):
        rows.append({"step": step, **refinement_point(path, k, probe)})
    atomic_write_json(cache, rows)
    return rows


def refinement_figure(curves: dict[str, list[dict]], k: int, path: Path) -> Path:
    from bupo.analysis.figures import _plt, _save

    fig, axes = _plt().subplots(1, 3, figsize=(14, 3.5))
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
    return _save(fig, path)  # atomic


# ---------------------------------------------------------------------------------------------------------------


def run_reproduce(out: Path, *, seeds: int = 5, rollout_steps: int = 16, internal_steps: int = 4,
                  eval_problems: int = 100, eval_samples: int = 8, ablations: bool = True) -> dict:
    from bupo.experiments.report import markdown_table_to_html, write_report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    summary = run_analysis(out / "analysis", samples=48, seed=0)
    k = int(summary["suggested_internal_layer"])
    num_layers = int(summary["num_layers"])
    common = dict(rollout_steps=rollout_steps, eval_problems=eval_problems, eval_samples=eval_samples)

    def train(name, algo, seed, s_inter=internal_steps, layer=k, save_every=0, eval_before=False):
        print(f"== {name}")
        run_training(out / "runs" / name, algo=algo, seed=seed, internal_steps=s_inter, internal_layer=layer,
                     eval_before=eval_before, save_every=save_every, **common)
        return metrics(eval_results(out / "runs" / name, first=False))

    # base model: one evaluation (step 0 of the first GRPO run); seed-0 runs keep checkpoints for the refinement
    per_seed = {"grpo": [], "bupo": []}
    for seed in range(seeds):
        for algo in ("grpo", "bupo"):
            per_seed[algo].append(train(f"{algo}-seed{seed}", algo, seed,
                                        save_every=max(1, rollout_steps // 4) if seed == 0 else 0,
                                        eval_before=(seed == 0 and algo == "grpo")))
    base = metrics(eval_results(out / "runs" / "grpo-seed0", first=True))

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
    curves, base_row = {}, None
    for label, name in (("GRPO", "grpo-seed0"), ("BuPO", "bupo-seed0")):
        # the base model (step 0) is the same for both curves: measured once
        curves[label] = refinement_over_training(out / "runs" / name, k, probe, base=base_row)
        base_row = curves[label][0]
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
                          table_md=table, settings=settings, extra_sections=sections, summary=summary)
    print(table)
    if abl_rows:
        print("\n" + "\n".join(abl_rows))
    print(f"\nreport: {report}   ({settings['wall_seconds']:.0f} s)")
    return results


# ---------------------------------------------------------------------------------------------------------------
# a real pretrained model: GRPO vs BuPO on the bundled arithmetic task with the final_number reward

REAL_DEFAULTS: dict[str, Any] = {
    # 1-operation problems: the level at which SmolLM2-135M-Instruct gets some but not all right (pass@8 measured
    # in docs/real-models.md), so GRPO groups have reward variance
    "difficulty": 1,
    "learning_rate": 1e-5,  # full fine-tuning of a 135M model; the bundled toy's 2e-4 would wreck it
    "max_completion_length": 128,
    # SmolLM2-135M-Instruct, 32 1-operation problems x 8 samples, 64 tokens: Pass@8 25.0 % at T = 1.0, 43.8 % at
    # T = 0.7 (docs/real-models.md): at T = 1 three groups in four have no correct answer and give no gradient
    "temperature": 0.7,
    "train_rows": 512,
    "analysis_samples": 8,
}


def _write_rows(path: Path, rows: list[dict]) -> str:
    from bupo.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _resolve_real_k(out: Path, model: str, internal_layer: int | None, analysis: str | None, rows: list[dict],
                    projection: str, max_new_tokens: int) -> tuple[int, str]:
    """(k, where it came from): the given k, else the analysis' suggestion; ValueError with the reason if none."""
    if internal_layer is not None:
        if internal_layer < 0:
            raise ValueError(f"--internal-layer must be a 0-based layer >= 0, got {internal_layer}")
        return internal_layer, "--internal-layer"
    if analysis is not None:
        from bupo.analysis import load_summary

        a = Path(analysis)
        summary = load_summary(a.parent if a.name == "summary.json" else a)
        source = f"analysis {analysis}"
    else:
        summary = run_analysis(out / "analysis", samples=REAL_DEFAULTS["analysis_samples"], seed=0, model=model,
                               rows=rows, max_new_tokens=max_new_tokens, projection=projection,
                               template="chat")  # the template its training runs use (below)
        source = f"analysis {out / 'analysis'}"
    k = summary.get("suggested_internal_layer")
    if k is None:
        reason = (summary.get("boundary") or {}).get("reason") or (summary.get("boundary") or {}).get("note")
        raise ValueError(f"the {source} suggests no internal layer ({reason or 'no boundary layer'}); pass "
                         "--internal-layer K (0-based) explicitly, e.g. from the final_norm analysis "
                         "(docs/real-models.md)")
    return int(k), source


def _phase_stats(log: list[dict], per: int) -> dict[str, dict[str, float]]:
    """Mean seconds per rollout step, mean grad norm and mean reward per phase, from a run's log_history.

    TRL's ``step_time`` is the mean seconds per optimizer step over the logging window (generation included in the
    first step of each rollout); one rollout step is ``per`` optimizer steps.
    """
    out: dict[str, dict[str, float]] = {}
    for phase, flag in (("internal", 1.0), ("full", 0.0)):
        rows = [r for r in log if r.get("bupo/phase") == flag and "step_time" in r]
        if rows:
            out[phase] = {
                "rollout_steps_logged": len(rows),
                "seconds_per_rollout_step": statistics.fmean(r["step_time"] for r in rows) * per,
                "grad_norm": statistics.fmean(r["grad_norm"] for r in rows if "grad_norm" in r)
                if any("grad_norm" in r for r in rows) else float("nan"),
                "reward": statistics.fmean(r["reward"] for r in rows if "reward" in r)
                if any("reward" in r for r in rows) else float("nan"),
            }
    return out


def _reward_curve(log: list[dict]) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["reward"])) for r in log if "reward" in r and "step" in r]


def reward_figure(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, *, per: int = 1,
                  internal_steps: int = 0) -> Path:
    """Train reward per rollout step (``per`` optimizer steps each; s_inter counts rollout steps), the fixed
    internal phase (rollout steps 1..``internal_steps``) shaded."""
    from bupo.analysis.figures import _plt, _save

    fig, ax = _plt().subplots(figsize=(7, 3.6))
    if internal_steps:
        ax.axvspan(0.5, internal_steps + 0.5, color="tab:orange", alpha=0.12,
                   label=f"fixed internal phase (s_inter = {internal_steps})")
    for label, pts in curves.items():
        if pts:
            ax.plot([p[0] / per for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("mean train reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)  # atomic


def run_real_model(out: Path, *, model: str | Path, seeds: int = 1, rollout_steps: int = 8, internal_steps: int = 2,
                   internal_layer: int | None = None, projections: list[str] | tuple[str, ...] = ("final_norm",),
                   analysis: str | None = None, difficulty: int = REAL_DEFAULTS["difficulty"],
                   eval_problems: int = 32, eval_samples: int = 4,
                   learning_rate: float = REAL_DEFAULTS["learning_rate"],
                   max_completion_length: int = REAL_DEFAULTS["max_completion_length"],
                   completions_per_rollout: int = 32, temperature: float = REAL_DEFAULTS["temperature"],
                   auto_cap: int | None = None, auto_seeds: int | None = None) -> dict:
    """GRPO vs BuPO on a real checkpoint, small enough for a 2-core CPU; resumable, reported as measured.

    Task: the bundled arithmetic task at ``difficulty`` operations (train split for training, ``eval_problems``
    disjoint test problems held out), prompts through the model's chat template, reward ``final_number`` (the last
    number of the completion; small models seldom write ``\\boxed{}``). Per seed: one GRPO run and one BuPO run per
    projection in ``projections`` (``raw`` = the paper's lm_head(h), ``final_norm`` = the logit lens), each
    ``rollout_steps`` rollout steps of ``completions_per_rollout`` completions (8 per prompt), BuPO's first ``internal_steps`` on layer k.
    ``temperature`` samples rollouts and evaluations alike. ``auto_cap``: also one BuPO run per seed and projection with
    ``internal_steps='auto'`` capped at ``auto_cap`` rollout steps (the adaptive switch), after all fixed runs; for the
    first ``auto_seeds`` seeds only when given.
    k: ``internal_layer``, else the analysis' suggestion (``analysis``, or a short one run here); ValueError when
    neither gives one. Writes ``results.json``, ``table.md`` and ``figures/rewards.png``; returns the results.
    """
    from bupo.data.task import make_examples
    from bupo.internal.adapters import PROJECTIONS

    bad = [p for p in projections if p not in PROJECTIONS]
    if not projections or bad:
        raise ValueError(f"--projection takes a comma-separated list of {', '.join(PROJECTIONS)}, got "
                         f"{','.join(projections)!r}")
    if completions_per_rollout < 16 or completions_per_rollout % 16:
        raise ValueError(f"--completions must be a multiple of 16 (8 per prompt, 2 optimizer steps per rollout "
                         f"step), got {completions_per_rollout}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0 (rollouts sample), got {temperature}")
    if auto_cap is not None and not 0 < auto_cap <= rollout_steps:
        raise ValueError(f"--auto-cap must be in 1..--rollout-steps ({rollout_steps}), got {auto_cap}")
    if auto_seeds is not None and auto_seeds < 1:
        raise ValueError(f"--auto-seeds must be >= 1, got {auto_seeds}")
    if not 0 < internal_steps <= rollout_steps:
        raise ValueError(f"--internal-steps must be in 1..--rollout-steps ({rollout_steps}), got {internal_steps}")
    from bupo.models import resolve_model

    model = resolve_model(str(model))  # a bupo name, folder or Hub id, with the same one-line errors as every --model
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train_rows = make_examples("train", REAL_DEFAULTS["train_rows"], seed=0, difficulty=difficulty)
    test_rows = make_examples("test", eval_problems, seed=0, difficulty=difficulty)
    train_file = _write_rows(out / "data" / "arith_train.jsonl", train_rows)
    test_file = _write_rows(out / "data" / f"arith_d{difficulty}_test.jsonl", test_rows)
    k, k_source = _resolve_real_k(out, str(model), internal_layer, analysis, test_rows, projections[0],
                                  max_completion_length)
    print(f"== k = {k} (0-based, paper layer {k + 1}) from {k_source}; s_inter = {internal_steps} of "
          f"{rollout_steps} rollout steps ({internal_steps / rollout_steps:.0%})")
    overrides = {
        "model_name_or_path": str(model), "data": train_file, "eval_data": [test_file], "reward": "final_number",
        "template": "chat", "max_completion_length": max_completion_length, "learning_rate": learning_rate,
        "eval_batch_size": 32, "logging_steps": 2, "probe_every": 0,
        "num_generations": 8, "per_device_train_batch_size": completions_per_rollout // 2,
        "temperature": temperature,
    }
    per = 2  # optimizer steps per rollout step (bupo.experiments.steps.STEPS_PER_ROLLOUT)
    runs: dict[str, dict[str, Any]] = {}
    plan = [(seed, lab, algo, proj, name) for seed in range(seeds)
            for lab, algo, proj, name in [("GRPO", "grpo", "raw", f"grpo-seed{seed}")]
            + [(f"BuPO ({p})", "bupo", p, f"bupo-{p}-seed{seed}") for p in projections]]
    if auto_cap is not None:  # after every fixed run, so that a short budget still finishes the main comparison
        plan += [(seed, f"BuPO auto ≤ {auto_cap} ({p})", "bupo", p, f"bupo-{p}-auto{auto_cap}-seed{seed}")
                 for seed in range(seeds if auto_seeds is None else min(auto_seeds, seeds)) for p in projections]
    for seed, label, algo, proj, name in plan:
        print(f"== {name}")
        run_dir = out / "runs" / name
        auto = "auto" in name
        run_training(run_dir, algo=algo, seed=seed, rollout_steps=rollout_steps,
                     internal_steps="auto" if auto else internal_steps,  # type: ignore[arg-type]
                     internal_layer=k, eval_problems=eval_problems, eval_samples=eval_samples,
                     eval_before=(algo == "grpo"),
                     overrides={**overrides, "internal_projection": proj,
                                **({"internal_steps_max": auto_cap} if auto else {})})
        log = json.loads((run_dir / "log_history.json").read_text())
        runs[name] = {"label": label, "seed": seed, "algo": algo, "projection": proj,
                      "after": metrics(eval_results(run_dir, first=False)),
                      "phases": _phase_stats(log, per), "reward_curve": _reward_curve(log)}
        if auto:
            bupo_run = json.loads((run_dir / "bupo_run.json").read_text())
            runs[name]["switch"] = bupo_run.get("switch", {})
        if algo == "grpo":
            runs[name]["before"] = metrics(eval_results(run_dir, first=True))
    base = [r["before"] for r in runs.values() if "before" in r]
    keys = list(base[0])
    lines = [f"Avg@{eval_samples} / Pass@K (%) on {eval_problems} held-out {difficulty}-operation problems, "
             f"{seeds} seed(s); k = {k}; s_inter = {internal_steps}/{rollout_steps} rollout steps.", "",
             "| run | " + " | ".join(keys) + " | s / rollout step (internal) | s / rollout step (full) | "
             "grad norm (internal) | grad norm (full) |",
             "|---|" + "---|" * (len(keys) + 4)]
    mean_base = {key: statistics.fmean(b[key] for b in base) for key in keys}
    lines.append("| base | " + " | ".join(f"{100 * mean_base[key]:.1f}" for key in keys) + " | | | | |")
    for label in dict.fromkeys(r["label"] for r in runs.values()):
        rs = [r for r in runs.values() if r["label"] == label]

        def cell(phase: str, what: str, fmt: str, rs: list[dict] = rs) -> str:
            vals = [r["phases"][phase][what] for r in rs if phase in r["phases"]]
            return format(statistics.fmean(vals), fmt) if vals else "—"

        lines.append(f"| {label} | " + " | ".join(
            f"{100 * statistics.fmean(r['after'][key] for r in rs):.1f}"
            + (f" ± {100 * _sd([r['after'][key] for r in rs]):.1f}" if len(rs) > 1 else "") for key in keys)
            + f" | {cell('internal', 'seconds_per_rollout_step', '.0f')} | "
              f"{cell('full', 'seconds_per_rollout_step', '.0f')} | {cell('internal', 'grad_norm', '.2f')} | "
              f"{cell('full', 'grad_norm', '.2f')} |")
    # paired by seed (same seed = same rollout prompts and evaluation seeds): each BuPO arm minus GRPO, after training
    grpo_by_seed = {r["seed"]: r["after"] for r in runs.values() if r["algo"] == "grpo"}
    for label in dict.fromkeys(r["label"] for r in runs.values() if r["algo"] == "bupo"):
        pairs = [(r["after"], grpo_by_seed[r["seed"]]) for r in runs.values()
                 if r["label"] == label and r["seed"] in grpo_by_seed]
        if len(pairs) > 1:
            cis = [paired_ci([a[key] - b[key] for a, b in pairs]) for key in keys]
            lines.append(f"| {label} − GRPO (paired, 95% CI) | " + " | ".join(
                f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for m, lo, hi in cis) + " | | | | |")
    switches = [(r["seed"], r["switch"]) for r in runs.values() if r.get("switch")]
    if switches:
        lines += ["", "Adaptive switch (first full-policy rollout step, reason): " + "; ".join(
            f"seed {seed}: step {sw.get('step')} ({sw.get('reason', '')})" for seed, sw in switches)]
    table = "\n".join(lines)
    fig = reward_figure({n: r["reward_curve"] for n, r in runs.items()}, out / "figures" / "rewards.png",
                        f"{Path(model).name}: train reward (final_number)", per=per,
                        internal_steps=internal_steps if isinstance(internal_steps, int) else 0)
    settings = {"model": str(model), "seeds": seeds, "rollout_steps": rollout_steps, "internal_steps": internal_steps,
                "s_inter_fraction": internal_steps / rollout_steps, "internal_layer": k,
                "internal_layer_paper": k + 1, "k_source": k_source, "projections": list(projections),
                "difficulty": difficulty, "eval_problems": eval_problems, "eval_samples": eval_samples,
                "learning_rate": learning_rate, "max_completion_length": max_completion_length,
                "reward": "final_number", "completions_per_rollout_step": completions_per_rollout,
                "temperature": temperature, "auto_cap": auto_cap, "auto_seeds": auto_seeds,
                "wall_seconds": round(time.time() - t0, 1)}
    results = {"settings": settings, "runs": runs, "table": table, "figure": str(fig)}
    atomic_write_json(out / "results.json", results)
    from bupo.io import atomic_write_text

    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    print(f"\n{out / 'results.json'}   ({settings['wall_seconds']:.0f} s)")
    return results
