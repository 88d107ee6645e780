"""Benchmark: the cost of scoring one rollout of adversarial completions with ``math_verify``, side by side with the
bound ``(limit + grace) x n / workers`` that the worker pool (:mod:`bupo.rewards.sandbox`) promises.

Usage::

    python benchmarks/bench_rewards.py [--n 64] [--limit 1.0] [--workers 1 2] [--json results.json]

Rows: each worker count scores ``n`` completions that all run into the time limit (sympy evaluating a power tower),
then ``n`` ordinary completions. "ratio" = measured seconds / (limit x n / workers): about 1 means the pool keeps
every worker busy with exactly one call at a time; the bound itself is (limit + 2 s kill grace) x n / workers.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--limit", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    args = ap.parse_args()

    from bupo.rewards import RewardStats, sandbox, score_batch

    rows = []
    for w in args.workers:
        sandbox.run_calls(_noop, [("", "")] * w, 5.0, w)  # workers up (start-up is not part of a rollout)
        for kind, text in (("adversarial", "\\boxed{10^{10^{10}}}"), ("ordinary", "so \\boxed{5}")):
            stats = RewardStats()
            t0 = time.monotonic()
            score_batch("math_verify", [text] * args.n, ["5"] * args.n, timeout=args.limit, workers=w, stats=stats)
            seconds = time.monotonic() - t0
            ideal = args.limit * args.n / w
            rows.append({"workers": w, "completions": kind, "n": args.n, "limit_s": args.limit, "seconds": seconds,
                         "limit_x_n_over_workers_s": ideal, "ratio": seconds / ideal, **stats.as_dict()})
            print(f"workers={w} {kind:11s} n={args.n} limit={args.limit}s: {seconds:7.2f} s "
                  f"(limit x n / workers = {ideal:6.2f} s, ratio {seconds / ideal:5.2f}; timeouts {stats.timeouts})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _noop(completion: str, ground_truth: str) -> float:
    return 0.0


if __name__ == "__main__":
    main()
