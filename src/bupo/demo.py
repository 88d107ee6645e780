"""``bupo demo``: the whole paper in miniature on the bundled model, in a few minutes on a laptop CPU.

1. analyse the bundled model's internal entropy flow and take the suggested k (the boundary-layer rule);
2. train GRPO and BuPO from the bundled model with the same seed and budget;
3. evaluate base, GRPO and BuPO on the held-out task (Avg@K, Pass@K);
4. write ``<out>/report.html`` (self-contained) and print the table.

Conventions: k is 0-based (paper layer k+1); entropies in nats; projection ``raw`` (the paper's).
Every step is resumable: finished analyses, trainings and evaluations are reused on a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

_THREADS_HELP = ("torch CPU threads (default 1: the bundled model's matrices are tiny, and on shared cores more threads "
                 "were measured up to 10x slower)")


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="analyse -> train GRPO and BuPO -> evaluate -> report, on the bundled model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo", help="output folder (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout-steps", type=int, default=16, help="rollout steps per training run (default 16)")
    p.add_argument("--internal-steps", type=int, default=2,
                   help="BuPO's s_inter: rollout steps on the internal policy (default 2)")
    p.add_argument("--internal-layer", default="auto", help="0-based k, or auto (the analysis' suggestion)")
    p.add_argument("--analysis-samples", type=int, default=32, help="responses analysed (default 32)")
    p.add_argument("--eval-problems", type=int, default=100, help="held-out problems evaluated (default 100)")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per problem: Avg@K / Pass@K (default 8)")
    p.add_argument("--threads", type=int, default=1, help=_THREADS_HELP)
    p.set_defaults(func=_demo)

    r = subparsers.add_parser(
        "reproduce", help="seeds x {GRPO, BuPO}, s_inter and k ablations, feature refinement; resumable",
        description="The paper's claims in miniature on the bundled model (see bupo.reproduce).",
    )
    r.add_argument("--out", default="reproduce", help="output folder (default: reproduce)")
    r.add_argument("--seeds", type=int, default=5, help="seeds per algorithm (default 5)")
    r.add_argument("--rollout-steps", type=int, default=16)
    r.add_argument("--internal-steps", type=int, default=4, help="the 'moderate' s_inter (default 4)")
    r.add_argument("--eval-problems", type=int, default=100)
    r.add_argument("--eval-samples", type=int, default=8)
    r.add_argument("--no-ablations", action="store_true", help="only the seed study")
    r.add_argument("--threads", type=int, default=1, help=_THREADS_HELP)
    r.set_defaults(func=_reproduce)


def _demo(args: argparse.Namespace) -> int:
    _check_positive(args, "rollout_steps", "analysis_samples", "eval_problems", "eval_samples")
    _set_threads(args.threads)
    if not 0 <= args.internal_steps <= args.rollout_steps:
        raise ValueError(f"--internal-steps must be in 0..--rollout-steps ({args.rollout_steps}), "
                         f"got {args.internal_steps}")
    run_demo(Path(args.out), seed=args.seed, rollout_steps=args.rollout_steps, internal_steps=args.internal_steps,
             internal_layer=args.internal_layer, analysis_samples=args.analysis_samples,
             eval_problems=args.eval_problems, eval_samples=args.eval_samples)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from bupo.reproduce import run_reproduce

    _check_positive(args, "seeds", "rollout_steps", "eval_problems", "eval_samples")
    _set_threads(args.threads)
    run_reproduce(Path(args.out), seeds=args.seeds, rollout_steps=args.rollout_steps,
                  internal_steps=args.internal_steps, eval_problems=args.eval_problems,
                  eval_samples=args.eval_samples, ablations=not args.no_ablations)
    return 0


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


# ---------------------------------------------------------------------------------------------------------------
# the steps (shared with bupo.reproduce)


def run_analysis(out_dir: Path, *, samples: int, seed: int) -> dict:
    """Analyse the bundled model on held-out problems (resumable); returns summary.json as a dict."""
    from bupo.analysis import analyze, load_summary
    from bupo.data.task import make_examples
    from bupo.zoo import DEFAULT_MODEL

    if (out_dir / "summary.json").is_file():  # a finished analysis (summary.json is written last) is reused
        return load_summary(out_dir)
    rows = make_examples("test", samples, seed=seed)
    res = analyze(DEFAULT_MODEL, data=rows, out_dir=out_dir, max_new_tokens=_max_new_tokens(), seed=seed,
                  progress=True)
    return res.summary


def _max_new_tokens() -> int:
    """The bundled model's own generation length (its generation_config.json)."""
    from bupo.zoo import bundled_model_path

    cfg = bundled_model_path() / "generation_config.json"
    return int(json.loads(cfg.read_text()).get("max_new_tokens", 96)) if cfg.is_file() else 96


# one rollout step: 32 completions (4 prompts x 8 samples), trained on in 2 optimizer steps of 16
_COMPLETIONS_PER_ROLLOUT = 32
_STEPS_PER_ROLLOUT = 2


def run_training(out_dir: Path, *, algo: str, seed: int, rollout_steps: int, internal_steps: int,
                 internal_layer: int | None, eval_problems: int, eval_samples: int, eval_before: bool,
                 save_every: int = 0) -> dict:
    """One ``bupo train`` run on the bundled model and task; reused when ``bupo_run.json`` already exists.

    Everything not set here is ``bupo train``'s calibrated small-run default (lr 2e-4 as in the bundled model's
    GRPO proof, 8 samples per prompt, dapo loss, no KL). ``save_every`` counts rollout steps (0: at the end only).
    """
    from bupo.training.run import RUN_FILE, parse_train_args, train

    done = out_dir / RUN_FILE
    if done.is_file():
        return json.loads(done.read_text())
    per = _STEPS_PER_ROLLOUT
    overrides = {
        "output_dir": str(out_dir), "seed": seed, "algo": algo, "max_steps": rollout_steps * per,
        "internal_steps": internal_steps if algo == "bupo" else 0, "internal_layer": internal_layer,
        "eval_rows": eval_problems, "eval_samples": eval_samples, "eval_before_train": eval_before,
        "save_steps": (save_every * per) if save_every else rollout_steps * per,
        # keep every checkpoint when they are wanted for metrics over training (None would not override the default)
        "save_total_limit": rollout_steps if save_every else 1,
        "steps_per_generation": per, "per_device_train_batch_size": _COMPLETIONS_PER_ROLLOUT // per,
    }
    train_args, script = parse_train_args([], overrides=overrides)
    if train_args.optimizer_steps_per_rollout != per:  # the step counts above assume it
        raise RuntimeError(f"expected {per} optimizer steps per rollout step, the training defaults give "
                           f"{train_args.optimizer_steps_per_rollout}")
    return train(train_args, script)


# ---------------------------------------------------------------------------------------------------------------
# the demo


def run_demo(out: Path, *, seed: int = 0, rollout_steps: int = 16, internal_steps: int = 2,
             internal_layer: str | int = "auto", analysis_samples: int = 32, eval_problems: int = 100,
             eval_samples: int = 8) -> dict:
    from bupo.demo_report import write_report
    from bupo.evaluation.report import compare_table
    from bupo.io import atomic_write_json

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] analysing the bundled model's internal entropy flow ({analysis_samples} responses)")
    summary = run_analysis(out / "analysis", samples=analysis_samples, seed=seed)
    k = summary["suggested_internal_layer"] if internal_layer == "auto" else int(internal_layer)
    print(f"      boundary layer (paper numbering) = {summary['boundary_layer']} -> internal layer k = {k} "
          f"(0-based)")
    for i, algo in enumerate(("grpo", "bupo")):
        print(f"[{2 + i}/4] training {algo.upper()} for {rollout_steps} rollout steps"
              + (f" ({internal_steps} on pi^{k + 1}, i.e. k={k})" if algo == "bupo" else ""))
        run_training(out / algo, algo=algo, seed=seed, rollout_steps=rollout_steps, internal_steps=internal_steps,
                     internal_layer=k, eval_problems=eval_problems, eval_samples=eval_samples,
                     eval_before=(algo == "grpo"))
    results = {
        "base": _eval_results(out / "grpo", first=True),
        "GRPO": _eval_results(out / "grpo", first=False),
        "BuPO": _eval_results(out / "bupo", first=False),
    }
    table = compare_table([(label, r) for label, r in results.items()])
    settings = {"seed": seed, "rollout_steps": rollout_steps, "internal_steps": internal_steps,
                "internal_layer": k, "internal_layer_paper": k + 1, "analysis_samples": analysis_samples,
                "eval_problems": eval_problems, "eval_samples": eval_samples, "projection": "raw",
                "wall_seconds": round(time.time() - t0, 1)}
    print("[4/4] writing the report")
    report = write_report(out / "report.html", title="bupo demo: BuPO vs GRPO on the bundled model",
                          analysis_dir=out / "analysis", runs={"GRPO": out / "grpo", "BuPO": out / "bupo"},
                          table_md=table, settings=settings, summary=summary)
    atomic_write_json(out / "results.json", {"settings": settings, "results": results})
    print()
    print(table)
    print(f"\nreport: {report}   ({settings['wall_seconds']:.0f} s)")
    return {"settings": settings, "results": results, "report": str(report)}


def _eval_results(run_dir: Path, *, first: bool) -> dict:
    evals = sorted((run_dir / "evals").glob("step-*/results.json"))
    if not evals:
        raise ValueError(f"{run_dir} has no evaluation results (evals/step-*/results.json)")
    from bupo.evaluation.report import load_results

    return load_results(evals[0] if first else evals[-1])
