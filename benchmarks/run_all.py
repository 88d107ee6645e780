"""Run every benchmark of the project and print one table of ratios (not a test).

    python benchmarks/run_all.py [--quick] [--skip-demo] [--out benchmarks/results]

Rows:
- internal layer-k log-prob, truncated forward vs the official full forward (time and peak memory; ideal (k+1)/L);
- BuPO optimizer step, internal phase vs full phase (goal <= (k+1)/L + 0.10);
- entropy analysis, bupo's streaming computation vs the official-style one (speed-up, memory);
- ``bupo demo`` wall time with its defaults.
Each benchmark measures its two sides in the same run; the raw JSON of each lands in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--skip-demo", action="store_true", help="do not time `bupo demo`")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    small = ["--layers", "6", "--hidden", "128", "--vocab", "2048", "--seq", "64", "--reps", "2"] if args.quick else []
    _run([py, str(HERE / "bench_internal.py"), *small, "--json", str(out / "internal.json")])
    _run([py, str(HERE / "bench_training.py"), *(["--reps", "3"] if args.quick else []),
          "--out", str(out / "training.json")])
    _run([py, str(HERE / "bench_analysis.py"), *(["--quick", "--repeat", "1"] if args.quick else []),
          "--json", str(out / "analysis.json")])
    demo_s = None
    if not args.skip_demo:
        t0 = time.time()
        demo_args = ["--rollout-steps", "2", "--internal-steps", "1", "--eval-limit", "8", "--eval-samples", "2",
                     "--analysis-limit", "4"] if args.quick else []
        _run([py, "-m", "bupo.cli", "demo", "--out", str(out / "demo"), *demo_args])
        demo_s = time.time() - t0

    rows = []
    for r in json.loads((out / "internal.json").read_text()):
        rows.append((f"layer-k log-prob fwd+bwd, k={r['k']}", "truncated / official time",
                     r["time_ratio"], f"ideal {r['ideal']:.2f}; memory ratio {r['mem_ratio']:.2f}"))
    tr = json.loads((out / "training.json").read_text())
    for r in tr["rows"]:
        rows.append((f"BuPO optimizer step, k={r['k']}", "internal / full phase time",
                     r["ratio"], f"goal <= {r['goal']:.2f}: {'met' if r['meets_goal'] else 'NOT met'}"))
    for r in json.loads((out / "analysis.json").read_text()):
        mem = r["bupo"]["peak_extra_mb"] / max(r["official"]["peak_extra_mb"], 1e-9)
        rows.append((f"entropy analysis: {r['case']}", "official / bupo time (speed-up)", r["speedup"],
                     f"memory ratio bupo/official {mem:.2f}; max |Δ| {r['max_abs_diff']:.1e} nats"))
    if demo_s is not None:
        rows.append(("bupo demo" + (" (--quick settings)" if args.quick else " (defaults)"), "wall seconds", demo_s,
                     "target <= 300 s on 2 cores"))
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'benchmark':<{width}}  {'ratio':<32} {'value':>8}  note")
    for name, what, value, note in rows:
        print(f"{name:<{width}}  {what:<32} {value:>8.2f}  {note}")
    (out / "summary.json").write_text(json.dumps(
        [{"benchmark": n, "ratio": w, "value": v, "note": t} for n, w, v, t in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
