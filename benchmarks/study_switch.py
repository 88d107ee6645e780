"""Study: the adaptive phase switch vs fixed s_inter vs GRPO on the bundled model (not a test).

Each arm is one ``bupo train`` run with ``bupo reproduce``'s settings (16 rollout steps of 32 completions, 2
optimizer steps each, lr 2e-4, k = the analysis' boundary layer, Avg@8 over 100 held-out bundled problems at the
end); arms differ only in how the internal phase ends:

    grpo      plain GRPO                           fixed1 / fixed4 / fixed12   s_inter = 1 / 4 / 12
    auto12    --internal-steps auto --internal-steps-max 12
    sched     --internal-schedule "k-2:2,k:2" (progressive; only with --schedule)

Paired over seeds (same seed = same data order and sampling seeds): mean ± std, and the paired difference of each
arm to auto with a 95% Student-t CI (bupo.experiments.steps.paired_ci). Resumable: a finished run (bupo_run.json) is reused.

    nice -n 5 python benchmarks/study_switch.py --out /tmp/study --seeds 5 \
        --json benchmarks/measured/study_switch.json
    python benchmarks/study_switch.py --out /tmp/trace --trace      # one s_inter=12 run: the signal traces
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROLLOUT_STEPS = 16
PER_ROLLOUT = 2  # optimizer steps per rollout step (bupo reproduce's)
COMPLETIONS = 32
ARMS = ("grpo", "fixed1", "fixed4", "fixed12", "auto12")


def arm_overrides(arm: str, k: int) -> dict:
    if arm == "grpo":
        return {"algo": "grpo", "internal_steps": 0}
    if arm.startswith("fixed"):
        return {"algo": "bupo", "internal_steps": int(arm[5:]), "internal_layer": k}
    if arm.startswith("auto"):
        return {"algo": "bupo", "internal_steps": "auto", "internal_steps_max": int(arm[4:]), "internal_layer": k}
    if arm == "sched":
        return {"algo": "bupo", "internal_schedule": f"{max(0, k - 2)}:2,{k}:2"}
    raise ValueError(f"unknown arm {arm!r}")


def run_arm(out_dir: Path, arm: str, seed: int, k: int, *, eval_problems: int = 100, eval_samples: int = 8,
            rollout_steps: int = ROLLOUT_STEPS, extra: dict | None = None) -> dict:
    """One ``bupo train`` run (bupo.training.run.train) with bupo reproduce's settings; reused when finished."""
    from bupo.training.run import RUN_FILE, parse_train_args, train

    if (out_dir / RUN_FILE).is_file():
        return json.loads((out_dir / RUN_FILE).read_text())
    overrides = {
        "output_dir": str(out_dir), "seed": seed, "max_steps": rollout_steps * PER_ROLLOUT,
        "eval_rows": eval_problems, "eval_samples": eval_samples, "eval_before_train": False,
        "save_steps": rollout_steps * PER_ROLLOUT, "save_total_limit": 1, "probe_every": 0,
        "steps_per_generation": PER_ROLLOUT, "per_device_train_batch_size": COMPLETIONS // PER_ROLLOUT,
        **arm_overrides(arm, k), **(extra or {}),
    }
    train_args, script = parse_train_args([], overrides=overrides)
    return train(train_args, script)


def trace_rows(run_dir: Path) -> list[dict]:
    """Per rollout step: the switch signals (measured before the step) and the step's reward / phase."""
    hist = json.loads((run_dir / "log_history.json").read_text())
    rows = {}
    for h in hist:
        if "bupo/rollout_step" not in h:
            continue
        r = int(h["bupo/rollout_step"])
        rows[r] = {"rollout_step": r, "phase": h.get("bupo/phase"), "reward": h.get("reward"),
                   **{k.split("/")[-1]: v for k, v in h.items() if k.startswith("bupo/switch/")}}
    return [rows[r] for r in sorted(rows)]


def boundary_layer(out: Path) -> int:
    from bupo.analysis import analyze
    from bupo.analysis.run import suggested_layer
    from bupo.data.task import make_examples
    from bupo.zoo import DEFAULT_MODEL, bundled_model_path

    adir = out / "analysis"
    if not (adir / "summary.json").is_file():  # as bupo reproduce: 48 held-out responses, the model's own length
        gen = json.loads((bundled_model_path() / "generation_config.json").read_text())
        analyze(DEFAULT_MODEL, data=make_examples("test", 48, seed=0), out_dir=adir, seed=0, figures=False,
                max_new_tokens=int(gen.get("max_new_tokens", 96)))
    return suggested_layer(adir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="working folder (runs are reused from there)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-list", type=int, nargs="*", help="run only these seeds (to split the study over processes)")
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--schedule", action="store_true", help="also the progressive-schedule arm 'sched'")
    ap.add_argument("--trace", action="store_true", help="only: one fixed s_inter=12 run (seed 0) with the signals")
    ap.add_argument("--table-only", action="store_true", help="only tabulate the finished runs (train nothing)")
    ap.add_argument("--ref", default="auto12", help="the arm the paired differences are taken against")
    ap.add_argument("--queue", action="store_true", help="work through unclaimed runs (parallel workers)")
    ap.add_argument("--layer", type=int, help="k (default: the analysis' boundary layer)")
    ap.add_argument("--json", help="write the table and per-seed values here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from bupo.io import atomic_write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k = args.layer if args.layer is not None else boundary_layer(out)
    if args.trace:
        # the signals are measured every rollout step only by the adaptive switch: an auto run with a cap of 12 and
        # a threshold no trace reaches is a fixed s_inter = 12 run that logs them
        run_arm(out / "trace-seed0", "auto12", 0, k, extra={"internal_switch_tolerance": 1e9})
        for row in trace_rows(out / "trace-seed0"):
            print(json.dumps(row))
        return 0
    arms = list(args.arms) + (["sched"] if args.schedule else [])
    if args.queue:  # a worker: take the next unclaimed run (several workers can share one --out)
        claims = out / ".claims"
        claims.mkdir(exist_ok=True)
        for seed in args.seed_list or range(args.seeds):
            for arm in arms:
                name = f"{arm}-seed{seed}"
                if (out / name / "bupo_run.json").is_file():
                    continue
                try:
                    (claims / name).mkdir()
                except FileExistsError:
                    continue
                t = time.time()
                s = run_arm(out / name, arm, seed, k)
                print(f"{name}: Avg@8 {100 * s['evals'][-1]['eval/avg']:.2f}  switch step "
                      f"{s.get('switch', {}).get('step')}  ({time.time() - t:.0f} s)", flush=True)
        return 0
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    runs: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            name = out / f"{arm}-seed{seed}"
            if args.table_only and not (name / "bupo_run.json").is_file():
                continue
            t = time.time()
            s = run_arm(name, arm, seed, k)
            sw = s.get("switch") or {}
            runs[arm][seed] = {"avg": s["evals"][-1]["eval/avg"], "switch_step": sw.get("step"),
                               "reason": sw.get("reason")}
            if not args.table_only:
                print(f"{arm} seed {seed}: Avg@8 {100 * runs[arm][seed]['avg']:.2f}  switch step "
                      f"{sw.get('step')}  ({time.time() - t:.0f} s)", flush=True)
    if args.seed_list and not args.table_only:
        return 0  # a partial run: the table comes from a final call over all seeds (finished runs are reused)
    md, table = study_table(runs, ref=args.ref if args.ref in arms else arms[0])
    print(md)
    if args.json:
        atomic_write_json(args.json, {
            "settings": {"model": "bundled", "seeds": seeds, "rollout_steps": ROLLOUT_STEPS,
                         "completions_per_rollout": COMPLETIONS, "optimizer_steps_per_rollout": PER_ROLLOUT,
                         "internal_layer": k, "eval": "Avg@8 over 100 held-out bundled problems, after training",
                         "ci": "paired Student t over the seeds both arms have, 95%"},
            "arms": table, "runs": {a: {str(sd): r for sd, r in v.items()} for a, v in runs.items()},
            "table_md": md})
    return 0


def study_table(runs: dict[str, dict[int, dict]], ref: str) -> tuple[str, dict]:
    """Markdown table: per arm mean ± std, per-seed values and the paired difference to ``ref`` with its 95% CI."""
    from bupo.experiments.steps import paired_ci

    lines = [f"| arm | seeds | Avg@8 mean ± std (%) | per seed (%) | switch step(s) | − {ref}, paired (pp) | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    table = {}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        v = [by_seed[s]["avg"] for s in seeds]
        shared = [s for s in seeds if s in runs[ref]]
        mean, lo, hi = paired_ci([by_seed[s]["avg"] - runs[ref][s]["avg"] for s in shared]) if shared else (
            float("nan"), float("nan"), float("nan"))
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        table[arm] = {"seeds": seeds, "avg": v, "mean": statistics.fmean(v), "std": sd, f"diff_vs_{ref}": mean,
                      "ci": [lo, hi], "paired_seeds": shared, "switch_steps": [by_seed[s]["switch_step"] for s in seeds]}
        steps = " / ".join(str(by_seed[s]["switch_step"]) for s in seeds) if arm.startswith(("auto", "fixed")) else "—"
        diff = "—" if arm == ref else f"{100 * mean:+.2f}"
        ci = "—" if arm == ref else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        lines.append(f"| {arm} | {len(v)} | {100 * statistics.fmean(v):.2f} ± {100 * sd:.2f} | "
                     f"{' / '.join(f'{100 * x:.1f}' for x in v)} | {steps} | {diff} | {ci} |")
    return "\n".join(lines), table

if __name__ == "__main__":
    sys.exit(main())
