"""``bupo reproduce``: the paper's claims in miniature on the bundled model, reported as measured.

- Seed study: ``seeds`` x the arms (default {GRPO, BuPO}; ``--arms`` adds the controls of
  :mod:`bupo.training.arms`: layers-only, one-layer at the middle layer L // 2, random-reward with p = the base
  model's measured Avg@K) with identical budgets; per arm the seeds behind each number, mean ± std per metric and the
  paired-difference 95% confidence interval (Student t over seeds) of arm − GRPO. The sign is whatever was measured.
- Ablations (seed 0), mirroring the paper's Table 2 and Table 3:
  s_inter small / moderate / long (paper: moderate helps, long collapses) and k = boundary layer / middle /
  penultimate.
- Feature refinement (paper Fig. 5a/b/d), on checkpoints saved every few rollout steps of the seed-0 GRPO and
  BuPO runs and a fixed probe batch of held-out responses of the base model: mean cosine similarity between
  H^k and every higher layer's H^j; ΔH_Layer of layer k, H(pi^k) − H(pi^{k−1}); KL(pi^k || pi^j) for j > k.

With ``--model DIR`` (a real pretrained checkpoint, e.g. SmolLM2-135M-Instruct): :func:`run_real_model`, the
smallest honest GRPO vs BuPO experiment on that model (:mod:`bupo.experiments.real_model`; docs/real-models.md has
the measured table).

Everything is resumable: a run whose ``bupo_run.json`` exists is not redone, metrics are cached per checkpoint.
Conventions: k is 0-based (paper layer k+1); entropies and KL in nats; projection ``raw`` on the bundled model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bupo.experiments.real_model import REAL_DEFAULTS, run_real_model
from bupo.experiments.steps import (
    THREADS_HELP,
    bundled_max_new_tokens,
    check_positive,
    eval_results,
    metrics,
    run_analysis,
    run_training,
    seed_table,
    seeds_headline,
    set_threads,
)
from bupo.io import atomic_write_json

DEFAULT_ARMS = "grpo,bupo"


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
    r.add_argument("--arms", default=DEFAULT_ARMS,
                   help="comma-separated arms of the seed study, grpo included (default grpo,bupo): grpo, bupo, "
                        "layers-only, one-layer, random-reward (bupo.training.arms; docs/training.md)")
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
    r.add_argument("--use-vllm", action="store_true",
                   help="--model: rollouts from vLLM in colocate mode (install: bash scripts/setup.sh vllm on a CPU); "
                        "evaluations stay on transformers")
    r.add_argument("--keep-checkpoints", action="store_true",
                   help="--model: keep each finished run's last checkpoint (with its optimizer state; 1.6 GB of a "
                        "SmolLM2 run's 2.1 GB); by default it is deleted once the run is finished, the final model, "
                        "evaluations and logs kept")
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
    from bupo.training.arms import parse_arms

    arms = parse_arms(args.arms)
    if "bupo" not in arms:
        raise ValueError("--arms must include bupo: the ablations and the feature refinement are BuPO's")
    if args.keep_checkpoints and not real:
        raise ValueError("--keep-checkpoints applies to --model runs (the bundled study keeps its checkpoints: it "
                         "measures the features over training from them)")
    if args.use_vllm and not real:
        raise ValueError("--use-vllm applies to --model runs (the bundled model's rollouts are short; HF generates them)")
    set_threads(args.threads)
    if real:
        projections = [p.strip() for p in args.projection.split(",") if p.strip()]
        run_real_model(Path(args.out), model=args.model, seeds=args.seeds, rollout_steps=args.rollout_steps,
                       internal_steps=args.internal_steps, internal_layer=args.internal_layer,
                       projections=projections, analysis=args.analysis, difficulty=args.difficulty,
                       eval_problems=args.eval_problems, eval_samples=args.eval_samples,
                       learning_rate=args.learning_rate, max_completion_length=args.max_completion_length,
                       completions_per_rollout=args.completions, temperature=args.temperature,
                       auto_cap=args.auto_cap, auto_seeds=args.auto_seeds, arms=arms, use_vllm=args.use_vllm,
                       keep_checkpoints=args.keep_checkpoints)
        return 0
    run_reproduce(Path(args.out), seeds=args.seeds, rollout_steps=args.rollout_steps,
                  internal_steps=args.internal_steps, eval_problems=args.eval_problems,
                  eval_samples=args.eval_samples, ablations=not args.no_ablations, arms=arms)
    return 0



# ---------------------------------------------------------------------------------------------------------------
# feature refinement (Fig. 5a/b/d)


def probe_batch(n: int = 16, seed: int = 1234):
    """Held-out prompts + base-model responses as one padded batch with the response positions marked."""
    import torch

    from bupo.analysis.traces import generate_traces, traces_from_generated
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
    from bupo.plotting import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.5))
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
    return save_figure(fig, path)  # atomic


# ---------------------------------------------------------------------------------------------------------------


def arm_run(arm: str, *, num_layers: int, base_accuracy: float | None) -> tuple[str, dict[str, Any]]:
    """``(bupo train algo, config overrides)`` of one arm of the seed study (:data:`bupo.training.arms.ARMS`)."""
    from bupo.training.arms import ARMS

    algo = ARMS[arm][0]
    if arm == "layers-only":
        return algo, {"internal_objective": "full"}
    if arm == "one-layer":
        return algo, {"train_layer": num_layers // 2}
    if arm == "random-reward":
        return algo, {"random_reward": base_accuracy}
    return algo, {}


def run_reproduce(out: Path, *, seeds: int = 5, rollout_steps: int = 16, internal_steps: int = 4,
                  eval_problems: int = 100, eval_samples: int = 8, ablations: bool = True,
                  arms: list[str] | None = None) -> dict:
    """The seed study over ``arms`` (default GRPO and BuPO), the ablations (unless ``ablations=False``) and the
    feature refinement on the bundled model; writes ``results.json`` and ``report.html``, returns the results."""
    from bupo.experiments.report import markdown_table_to_html, write_report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    summary = run_analysis(out / "analysis", samples=48, seed=0)
    k = int(summary["suggested_internal_layer"])
    num_layers = int(summary["num_layers"])
    common = dict(rollout_steps=rollout_steps, eval_problems=eval_problems, eval_samples=eval_samples)

    def train(name, algo, seed, s_inter=internal_steps, layer=k, save_every=0, eval_before=False, overrides=None):
        print(f"== {name}")
        run_training(out / "runs" / name, algo=algo, seed=seed, internal_steps=s_inter, internal_layer=layer,
                     eval_before=eval_before, save_every=save_every, overrides=overrides, **common)
        return metrics(eval_results(out / "runs" / name, first=False))

    # base model: one evaluation (step 0 of the first GRPO run), whose Avg@K is the random-reward arm's p;
    # the seed-0 GRPO and BuPO runs keep checkpoints for the refinement
    arms = list(arms or DEFAULT_ARMS.split(","))
    per_seed: dict[str, list[dict]] = {arm: [] for arm in arms}
    base: dict[str, float] = {}
    for seed in range(seeds):
        for arm in arms:  # grpo first (bupo.training.arms.parse_arms)
            algo, overrides = arm_run(arm, num_layers=num_layers, base_accuracy=base.get("avg"))
            per_seed[arm].append(train(f"{arm}-seed{seed}", algo, seed, overrides=overrides,
                                       save_every=max(1, rollout_steps // 4) if seed == 0 and arm in ("grpo", "bupo")
                                       else 0, eval_before=(seed == 0 and arm == "grpo")))
            if not base:
                base = metrics(eval_results(out / "runs" / "grpo-seed0", first=True))
    seed_md, stats = seed_table(base, per_seed)
    abl_rows, ablation_results = (_ablations(train, per_seed, list(base), k=k, num_layers=num_layers,
                                             internal_steps=internal_steps, rollout_steps=rollout_steps)
                                  if ablations else ([], {}))

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
                "eval_samples": eval_samples, "arms": arms, "wall_seconds": round(time.time() - t0, 1)}
    if "one-layer" in arms:
        settings["one_layer_train_layer"] = num_layers // 2
    if "random-reward" in arms:
        settings["random_reward_p"] = base["avg"]
    results = {"settings": settings, "seed_study": stats, "ablations": ablation_results, "refinement": curves}
    atomic_write_json(out / "results.json", results)
    sections = [("Ablations (seed 0)", markdown_table_to_html("\n".join(abl_rows)) if abl_rows else "<p>skipped</p>"),
                ("Feature refinement (seed 0)", img_tag(fig))]
    table = (f"Seed study: {seeds} seed{'s' if seeds > 1 else ''} per arm (column seeds), Avg@{eval_samples} / "
             f"Pass@K over {eval_problems} held-out problems, in %. CI: each arm − GRPO, paired Student t over "
             "seeds.\n\n" + seed_md)
    report = write_report(out / "report.html", title="bupo reproduce: BuPO vs GRPO in miniature",
                          analysis_dir=out / "analysis",
                          runs={"GRPO": out / "runs" / "grpo-seed0", "BuPO": out / "runs" / "bupo-seed0"},
                          table_md=table, settings=settings, extra_sections=sections, summary=summary,
                          headline=seeds_headline(seeds, arms))
    print(table)
    if abl_rows:
        print("\n" + "\n".join(abl_rows))
    print(f"\nreport: {report}   ({settings['wall_seconds']:.0f} s)")
    return results


def _ablations(train, per_seed: dict[str, list[dict]], keys: list[str], *, k: int, num_layers: int,
               internal_steps: int, rollout_steps: int) -> tuple[list[str], dict]:
    """Seed-0 ablations (paper Tables 2 and 3): s_inter small / moderate / long and k = boundary / middle /
    penultimate, trained with ``train(name, algo, seed, s_inter=..., layer=...)``; the table rows and the numbers."""
    moderate = per_seed["bupo"][0]
    s_small, s_long = max(1, internal_steps // 4), min(rollout_steps, 3 * internal_steps)
    ablation_results = {"s_inter": {
        f"small (s_inter={s_small})": train(f"bupo-sinter{s_small}", "bupo", 0, s_inter=s_small),
        f"moderate (s_inter={internal_steps})": moderate,
        f"long (s_inter={s_long})": train(f"bupo-sinter{s_long}", "bupo", 0, s_inter=s_long),
    }}
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
    return abl_rows, ablation_results
