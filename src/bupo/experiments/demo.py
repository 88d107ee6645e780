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
import time
from pathlib import Path
from typing import Any

from bupo.experiments.steps import (
    THREADS_HELP,
    check_positive,
    eval_results,
    metrics,
    run_analysis,
    run_training,
    seed_table,
    set_threads,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="analyse -> train GRPO and BuPO -> evaluate -> report, on the bundled model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo", help="output folder (default: demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the analysis, the training runs and the evaluation "
                   "(default 0)")
    p.add_argument("--rollout-steps", type=int, default=16, help="rollout steps per training run (default 16)")
    p.add_argument("--internal-steps", type=int, default=2,
                   help="BuPO's s_inter: rollout steps on the internal policy (default 2)")
    p.add_argument("--internal-layer", default="auto", help="0-based k, or auto (the analysis' suggestion)")
    p.add_argument("--analysis-limit", "--analysis-samples", dest="analysis_samples", type=int, default=32,
                   metavar="N", help="held-out problems analysed, one response each (default 32)")
    p.add_argument("--eval-limit", "--eval-problems", dest="eval_problems", type=int, default=100, metavar="N",
                   help="held-out problems evaluated (default 100)")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per problem: Avg@K / Pass@K (default 8)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    check_positive(args, "rollout_steps", "analysis_samples", "eval_problems", "eval_samples")
    set_threads(args.threads)
    if not 0 <= args.internal_steps <= args.rollout_steps:
        raise ValueError(f"--internal-steps must be in 0..--rollout-steps ({args.rollout_steps}), "
                         f"got {args.internal_steps}")
    run_demo(Path(args.out), seed=args.seed, rollout_steps=args.rollout_steps, internal_steps=args.internal_steps,
             internal_layer=args.internal_layer, analysis_samples=args.analysis_samples,
             eval_problems=args.eval_problems, eval_samples=args.eval_samples)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the demo


def headline(results: dict, *, seed: int, eval_samples: int) -> str:
    """The report's first sentence: the one-seed result, said to be one seed, and where the interval comes from."""
    g, b = (100 * metrics(results[label])["avg"] for label in ("GRPO", "BuPO"))
    return (f"One seed (seed {seed}): GRPO {g:.2f} vs BuPO {b:.2f} Avg@{eval_samples} (%). A single seed gives no "
            "interval and cannot tell the two apart; `bupo reproduce` trains 5 seeds of each with the same budget "
            "and reports the paired 95% confidence interval of BuPO − GRPO.")


def run_demo(out: Path, *, seed: int = 0, rollout_steps: int = 16, internal_steps: int = 2,
             internal_layer: str | int = "auto", analysis_samples: int = 32, eval_problems: int = 100,
             eval_samples: int = 8) -> dict:
    from bupo.evaluation.report import compare_table
    from bupo.experiments.report import write_report
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
        "base": eval_results(out / "grpo", first=True),
        "GRPO": eval_results(out / "grpo", first=False),
        "BuPO": eval_results(out / "bupo", first=False),
    }
    seeds_md, _ = seed_table(metrics(results["base"]), {"grpo": [metrics(results["GRPO"])],
                                                         "bupo": [metrics(results["BuPO"])]})
    table = (compare_table([(label, r) for label, r in results.items()])
             + f"\n\nSeeds behind each number: 1 (seed {seed}), so BuPO − GRPO has no confidence interval:\n\n"
             + seeds_md)
    settings = {"seed": seed, "rollout_steps": rollout_steps, "internal_steps": internal_steps,
                "internal_layer": k, "internal_layer_paper": k + 1, "analysis_samples": analysis_samples,
                "eval_problems": eval_problems, "eval_samples": eval_samples, "projection": "raw",
                "wall_seconds": round(time.time() - t0, 1)}
    print("[4/4] writing the report")
    report = write_report(out / "report.html", title="bupo demo: BuPO vs GRPO on the bundled model",
                          analysis_dir=out / "analysis", runs={"GRPO": out / "grpo", "BuPO": out / "bupo"},
                          table_md=table, settings=settings, summary=summary,
                          headline=headline(results, seed=seed, eval_samples=eval_samples))
    atomic_write_json(out / "results.json", {"settings": settings, "results": results})
    print()
    print(table)
    print(f"\nreport: {report}   ({settings['wall_seconds']:.0f} s)")
    return {"settings": settings, "results": results, "report": str(report)}
