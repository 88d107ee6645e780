"""The steps ``bupo demo`` and ``bupo reproduce`` share: analyse, train one run, read its evaluations, and the
statistics over seeds (:func:`paired_ci`).

One home for them, so that neither command imports the other's helpers. Every step is resumable: a finished
analysis (``summary.json``) or training (``bupo_run.json``) is reused on a rerun.

Conventions: k is 0-based (paper layer k+1); entropies in nats; projection ``raw`` (the paper's) unless given.
Imports only the standard library at top level (the CLI's rule: ``bupo --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

THREADS_HELP = ("torch CPU threads (default 1: the bundled model's matrices are tiny, and on shared cores more threads "
                "were measured up to 10x slower)")

# one rollout step: 32 completions (4 prompts x 8 samples), trained on in 2 optimizer steps of 16
COMPLETIONS_PER_ROLLOUT = 32
STEPS_PER_ROLLOUT = 2


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)``; ValueError for n < 1."""
    import torch

    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


# settings whose flag is the shared row-limit vocabulary (docs/cli.md) rather than their old name
RENAMED_FLAGS = {"eval_problems": "--eval-limit", "train_problems": "--train-limit", "analysis_samples": "--analysis-limit"}


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first ``--flag`` among ``names`` that is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            flag = RENAMED_FLAGS.get(name, "--" + name.replace("_", "-"))
            raise ValueError(f"{flag} must be >= 1, got {getattr(args, name)}")


def bundled_max_new_tokens() -> int:
    """The bundled model's own generation length (its generation_config.json)."""
    from bupo.zoo import bundled_model_path

    cfg = bundled_model_path() / "generation_config.json"
    return int(json.loads(cfg.read_text()).get("max_new_tokens", 96)) if cfg.is_file() else 96


def run_analysis(out_dir: Path, *, samples: int, seed: int, model: str | Path | None = None,
                 rows: list[dict] | None = None, max_new_tokens: int | None = None, projection: str = "raw",
                 template: str = "auto") -> dict:
    """Analyse ``model`` (default: the bundled one) on ``rows`` (default: ``samples`` held-out bundled problems);
    resumable. Returns summary.json as a dict. ``template="auto"`` picks the prompt template as ``bupo train`` does,
    so the analysis reads the prompts the training runs see. ``max_new_tokens`` defaults to the bundled model's own length."""
    from bupo.analysis import analyze, load_summary
    from bupo.data.task import make_examples
    from bupo.zoo import DEFAULT_MODEL

    if (out_dir / "summary.json").is_file():  # a finished analysis (summary.json is written last) is reused
        return load_summary(out_dir)
    if rows is None:
        rows = make_examples("test", samples, seed=seed)
    res = analyze(str(model) if model is not None else DEFAULT_MODEL, data=rows[:samples], out_dir=out_dir,
                  max_new_tokens=max_new_tokens or bundled_max_new_tokens(), seed=seed, projection=projection,
                  template=template, progress=True)
    return res.summary


def run_training(out_dir: Path, *, algo: str, seed: int, rollout_steps: int, internal_steps: int,
                 internal_layer: int | None, eval_problems: int, eval_samples: int, eval_before: bool,
                 save_every: int = 0, overrides: dict[str, Any] | None = None, isolate: bool = False) -> dict:
    """One ``bupo train`` run (default: the bundled model and task); reused when ``bupo_run.json`` already exists.

    Everything not set here is ``bupo train``'s calibrated small-run default (lr 2e-4 as in the bundled model's
    GRPO proof, 8 samples per prompt, dapo loss, no KL). ``save_every`` counts rollout steps (0: at the end only).
    ``overrides``: further ``bupo train`` config keys (model, data, reward, lengths, ...), applied last; they may
    change the rollout shape (``steps_per_generation`` must then keep its value, which the step counts assume).
    ``isolate``: train in a fresh child process (spawned; the settings are still checked here first), so that what
    a run leaves behind below Python dies with it: a colocated vLLM engine's memory is not given back to the
    process when the run ends (five SmolLM2 runs in one process filled 24 GB), and a second engine in the same
    process cannot reuse the first one's process group. RuntimeError when the child fails (its traceback is printed
    above); a rerun resumes from the run's last checkpoint as usual.
    """
    from bupo.training.arguments import run_settings
    from bupo.training.run import RUN_FILE, train

    done = out_dir / RUN_FILE
    if done.is_file():
        return json.loads(done.read_text())
    per = STEPS_PER_ROLLOUT
    merged = {
        "output_dir": str(out_dir), "seed": seed, "algo": algo, "max_steps": rollout_steps * per,
        "internal_steps": internal_steps if algo == "bupo" else None, "internal_layer": internal_layer,
        "eval_rows": eval_problems, "eval_samples": eval_samples, "eval_before_train": eval_before,
        "save_steps": (save_every * per) if save_every else rollout_steps * per,
        # keep every checkpoint when they are wanted for metrics over training (None would not override the default)
        "save_total_limit": rollout_steps if save_every else 1,
        "steps_per_generation": per, "per_device_train_batch_size": COMPLETIONS_PER_ROLLOUT // per,
        # a run killed after a checkpoint continues from it (bupo train refuses a started folder without --resume)
        "resume": "latest" if any(out_dir.glob("checkpoint-*")) else None,
        **(overrides or {}),
    }
    train_args, script = run_settings(merged)
    if train_args.optimizer_steps_per_rollout != per:  # the step counts above assume it
        raise RuntimeError(f"expected {per} optimizer steps per rollout step, the training defaults give "
                           f"{train_args.optimizer_steps_per_rollout}")
    if isolate:
        return _train_in_child(out_dir, merged)
    return train(train_args, script)


def drop_checkpoints(run_dir: Path) -> int:
    """Delete a *finished* run's ``checkpoint-*`` folders (a resumable state it no longer needs: its final model,
    evaluations and logs stay); bytes freed. A run without ``bupo_run.json`` keeps them (a rerun resumes from them)."""
    import shutil

    from bupo.training.run import RUN_FILE

    if not (run_dir / RUN_FILE).is_file():
        return 0
    freed = 0
    for ckpt in sorted(run_dir.glob("checkpoint-*")):
        if ckpt.is_dir():
            freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            shutil.rmtree(ckpt)
    return freed


def _train_in_child(out_dir: Path, settings: dict[str, Any]) -> dict:
    """:func:`run_training`'s run in a spawned child process with this process's torch thread count; its summary
    (``bupo_run.json``), or RuntimeError naming the exit code."""
    import multiprocessing

    import torch

    from bupo.training.run import RUN_FILE

    child = multiprocessing.get_context("spawn").Process(target=_child_train, args=(settings, torch.get_num_threads()),
                                                         name=f"bupo-train-{out_dir.name}")
    child.start()
    child.join()
    done = out_dir / RUN_FILE
    if child.exitcode != 0 or not done.is_file():
        raise RuntimeError(f"training {out_dir} failed in its child process (exit code {child.exitcode}; its error "
                           "is printed above); rerun to resume from its last checkpoint")
    return json.loads(done.read_text())


#: the rendezvous a one-process run inherits from an earlier in-process run in its parent (TRL's colocated vLLM sets
#: RANK / WORLD_SIZE, bupo a free MASTER_PORT): that port may still be held by the parent's process group
_RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _child_train(settings: dict[str, Any], threads: int) -> None:
    """The child's side of :func:`_train_in_child` (a top-level function: spawn imports it by name): a fresh
    one-process run, with its own rendezvous unless the parent is one rank of several."""
    import os

    if os.environ.get("WORLD_SIZE", "1") == "1":
        for key in _RENDEZVOUS_ENV:
            os.environ.pop(key, None)
    from bupo.training.arguments import run_settings
    from bupo.training.run import train

    set_threads(threads)
    train(*run_settings(settings))


def eval_results(run_dir: Path, *, first: bool) -> dict:
    """The first (step 0, when evaluated before training) or last evaluation of a run (results.json as a dict)."""
    evals = sorted((run_dir / "evals").glob("step-*/results.json"))
    if not evals:
        raise ValueError(f"{run_dir} has no evaluation results (evals/step-*/results.json)")
    from bupo.evaluation.report import load_results

    return load_results(evals[0] if first else evals[-1])


def metrics(results: dict) -> dict[str, float]:
    """Avg@K and each Pass@K of one evaluation, averaged over its benchmarks (fractions)."""
    benches = list(results["benchmarks"].values())
    out = {"avg": statistics.fmean(b["avg"] for b in benches)}
    for k in sorted({int(k) for b in benches for k in b["pass_at_k"]}):
        vals = [b["pass_at_k"][str(k)] for b in benches if str(k) in b["pass_at_k"]]
        out[f"pass@{k}"] = statistics.fmean(vals)
    return out


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


def sd(xs: list[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


ARM_LABELS = {"grpo": "GRPO", "bupo": "BuPO", "layers-only": "layers-only", "one-layer": "one-layer",
              "random-reward": "random-reward"}


def seed_table(base: dict[str, float], per_arm: dict[str, list[dict]]) -> tuple[str, dict]:
    """The markdown table of a seed study and its numbers per metric: per arm the seeds behind the number, mean ±
    std over them and, against GRPO (``per_arm["grpo"]``, same seeds), the paired difference with its 95% CI
    (Student t over seeds; none from one seed, which the table says). Values are fractions, printed in %."""
    rows = ["| metric | base | arm | seeds | mean ± std (%) | − GRPO, paired (pp) | 95% CI (pp) |",
            "|---|---|---|---|---|---|---|"]
    stats: dict[str, dict] = {}
    grpo = per_arm["grpo"]
    for key in base:
        g = [m[key] for m in grpo]
        entry: dict[str, Any] = {"base": base[key], "seeds": len(g), "vs_grpo": {}}
        for arm, runs in per_arm.items():
            vals = [m[key] for m in runs]
            entry[arm] = vals
            spread = f" ± {100 * sd(vals):.2f}" if len(vals) > 1 else ""
            cells = [f"{100 * statistics.fmean(vals):.2f}{spread}", "—", "—"]
            if arm != "grpo":
                mean, lo, hi = paired_ci([a - b for a, b in zip(vals, g, strict=True)])
                entry["vs_grpo"][arm] = {"diff_mean": mean, "diff_ci": [lo, hi]}
                ci = f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" if len(vals) > 1 else "none (1 seed)"
                cells[1:] = [f"{100 * mean:+.2f}", ci]
            rows.append(f"| {key} | {100 * base[key]:.2f} | {ARM_LABELS.get(arm, arm)} | {len(vals)} | "
                        + " | ".join(cells) + " |")
        if "bupo" in entry["vs_grpo"]:  # the seed study's original keys
            entry.update(entry["vs_grpo"]["bupo"])
        stats[key] = entry
    return "\n".join(rows), stats


def seeds_headline(seeds: int, arms: list[str]) -> str:
    """The first sentence of a seed study's report: how many seeds stand behind each number (one: said so)."""
    others = ", ".join(ARM_LABELS.get(a, a) for a in arms if a != "grpo") or "none"
    if seeds == 1:
        return (f"One seed per arm (GRPO; {others}): every number is a single run, so no confidence interval can "
                "be given and differences of a few points may be noise; rerun with --seeds 5 for paired 95% CIs.")
    return (f"{seeds} seeds per arm (GRPO; {others}) stand behind every number: mean ± std over seeds, and each arm "
            f"− GRPO paired over the same seeds with its 95% confidence interval (Student t, {seeds - 1} df).")
