"""The scale-free adaptive switch (``internal_switch_rule: relative``) on the bundled model's own probe signals (not a
test).

One BuPO run per seed on the bundled model with ``bupo reproduce``'s settings (32 completions per rollout step, 2
optimizer steps each, k = the analysis' boundary layer) and ``--internal-steps auto --internal-steps-max 12`` with
thresholds no trace reaches: every rollout step is internal and the probe signals of all 12 are recorded (the rule is
pure and a run is identical to its trace up to the switch, so replaying a rule on the trace gives the switch that rule
would have taken). Each rule is then replayed on the trace with the signals multiplied by 0.1, 1 and 10 (a model whose
probe moves on another scale): the absolute rule (nats thresholds 0.05 / 0.01) moves with the scale, the relative rule
(3 x the step-to-step spread over the first 3 internal steps) does not.

    nice -n 5 python benchmarks/switch_scale_free.py --out /tmp/sf --seeds 0 1 \
        --json benchmarks/measured/switch_scale_free.json

``--model NAME --internal-layer K`` records the trace on a real checkpoint instead, with ``bupo reproduce --model``'s
task and settings (the arithmetic task at 1 operation through the chat template, reward ``final_number``, lr 2e-5,
T = 0.7, ``--completions`` (default 32) of ``--max-completion-length`` tokens per rollout step, the ``final_norm``
projection;
``--use-vllm`` generates with a colocated engine in a child process), ``--cap`` rollout steps (default 12):

    .venv-vllm/bin/python benchmarks/switch_scale_free.py --out /tmp/sf-smol --model smollm2-135m-instruct \
        --internal-layer 22 --cap 8 --max-completion-length 64 --use-vllm \
        --json benchmarks/measured/switch_scale_free_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SCALES = (0.1, 1.0, 10.0)
CAP = 12


def recorded_trace(out: Path, seed: int, k: int, cap: int = CAP) -> list[dict]:
    from study_switch import run_arm

    run = run_arm(out / f"trace-seed{seed}", f"auto{cap}", seed, k, rollout_steps=cap,
                  extra={"internal_switch_tolerance": 1e9, "internal_switch_kl_rise": 1e9, "eval_data": ["none"]})
    return run["switch"]["trace"]


def real_trace(out: Path, seed: int, k: int, *, model: str, cap: int, max_completion_length: int,
               use_vllm: bool, completions: int = 32) -> list[dict]:
    """The all-internal trace of ``cap`` rollout steps on a real checkpoint, ``bupo reproduce --model``'s settings."""
    from bupo.experiments.real_model import real_run_settings, write_train_rows
    from bupo.experiments.steps import run_training
    from bupo.models import resolve_model

    settings = {
        **real_run_settings(resolve_model(model), write_train_rows(out), ["none"],
                            max_completion_length=max_completion_length, learning_rate=2e-5,
                            completions_per_rollout=completions, temperature=0.7, use_vllm=use_vllm),
        "internal_projection": "final_norm", "internal_steps_max": cap,
        "internal_switch_tolerance": 1e9, "internal_switch_kl_rise": 1e9,  # never fires: all cap steps recorded
    }
    run = run_training(out / f"trace-seed{seed}", algo="bupo", seed=seed, rollout_steps=cap,
                       internal_steps="auto", internal_layer=k, eval_problems=1, eval_samples=1,  # type: ignore[arg-type]
                       eval_before=False, overrides=settings, isolate=use_vllm)
    return run["switch"]["trace"]


def replay(rule, trace: list[dict], scale: float) -> int | None:
    """The switch step ``rule`` takes on ``trace`` with the log-prob and KL signals multiplied by ``scale``."""
    from bupo.training.switch import SwitchSignals

    for row in trace:
        s = SwitchSignals(**{k: (float("nan") if v is None else v) for k, v in row.items()})
        d = rule.update(replace(s, full_logp=scale * s.full_logp, kl_internal_full=scale * s.kl_internal_full))
        if not d.internal:
            return d.step
    return None


def main(argv: list[str] | None = None) -> int:
    from bupo.training.switch import RelativeSwitchRule, SwitchRule
    from study_switch import boundary_layer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", help="write the traces and decisions here")
    ap.add_argument("--model", help="a real checkpoint (bupo name, folder); needs --internal-layer")
    ap.add_argument("--internal-layer", type=int, help="k (0-based) for --model")
    ap.add_argument("--cap", type=int, default=CAP, help=f"rollout steps recorded (default {CAP})")
    ap.add_argument("--max-completion-length", type=int, default=64, help="--model only (default 64)")
    ap.add_argument("--use-vllm", action="store_true", help="--model only: rollouts from a colocated vLLM engine")
    ap.add_argument("--completions", type=int, default=32, help="--model only: completions per rollout step (x16)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if (args.model is None) != (args.internal_layer is None):
        ap.error("--model and --internal-layer go together")
    k = boundary_layer(out) if args.model is None else args.internal_layer
    cap = args.cap
    rules = {"absolute (0.05 / 0.01 nats)": lambda: SwitchRule(cap=cap),
             "relative (3 x spread, 3 steps)": lambda: RelativeSwitchRule(cap=cap)}
    result = {"settings": {"model": args.model or "bundled", "internal_layer": k, "cap": cap, "scales": list(SCALES),
                           **({"max_completion_length": args.max_completion_length, "use_vllm": args.use_vllm,
                               "projection": "final_norm", "completions_per_rollout_step": args.completions}
                              if args.model else {}),
                           "note": "switch step = the first rollout step on the full policy (None: never before the "
                                   "cap); replayed on the recorded all-internal trace"}, "seeds": {}}
    lines = ["| seed | rule | " + " | ".join(f"x{s:g}" for s in SCALES) + " |", "|---|---|" + "---|" * len(SCALES)]
    for seed in args.seeds:
        trace = (recorded_trace(out, seed, k, cap) if args.model is None else
                 real_trace(out, seed, k, model=args.model, cap=cap, max_completion_length=args.max_completion_length,
                            use_vllm=args.use_vllm, completions=args.completions))
        decisions = {name: {str(s): replay(make(), trace, s) for s in SCALES} for name, make in rules.items()}
        result["seeds"][str(seed)] = {"trace": trace, "switch_step": decisions}
        for name, by_scale in decisions.items():
            lines.append(f"| {seed} | {name} | " + " | ".join(str(by_scale[str(s)]) for s in SCALES) + " |")
    result["table_md"] = "\n".join(lines)
    print(result["table_md"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
