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


def recorded_trace(out: Path, seed: int, k: int) -> list[dict]:
    from study_switch import run_arm

    run = run_arm(out / f"trace-seed{seed}", f"auto{CAP}", seed, k, rollout_steps=CAP,
                  extra={"internal_switch_tolerance": 1e9, "internal_switch_kl_rise": 1e9, "eval_data": ["none"]})
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
    args = ap.parse_args(argv)
    out = Path(args.out)
    k = boundary_layer(out)
    rules = {"absolute (0.05 / 0.01 nats)": lambda: SwitchRule(cap=CAP),
             "relative (3 x spread, 3 steps)": lambda: RelativeSwitchRule(cap=CAP)}
    result = {"settings": {"model": "bundled", "internal_layer": k, "cap": CAP, "scales": list(SCALES),
                           "note": "switch step = the first rollout step on the full policy (None: never before the "
                                   "cap); replayed on the recorded all-internal trace"}, "seeds": {}}
    lines = ["| seed | rule | " + " | ".join(f"x{s:g}" for s in SCALES) + " |", "|---|---|" + "---|" * len(SCALES)]
    for seed in args.seeds:
        trace = recorded_trace(out, seed, k)
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
