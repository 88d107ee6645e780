"""Avg@K and the unbiased Pass@K estimator.

- Avg@K (the paper's main metric; K = samples per problem: 32 for AIME, 16 for AMC/MATH500) is the
  mean accuracy over the K samples of each problem, averaged over problems. It equals the unbiased
  Pass@1 estimate from the same K samples.
- Pass@K (Chen et al. 2021) from n >= K samples with c correct is 1 - C(n-c, K) / C(n, K), computed as
  the product  1 - prod_{i=0}^{K-1} (n-c-i)/(n-i)  (every factor in [0, 1]: no huge binomials, no
  cancellation), and 1.0 when n - c < K. Averaged over problems.

Values are fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["PAPER_KS", "avg_at_k", "default_ks", "mean_pass_at_k", "pass_at_k"]

# the paper's Pass@K grid (Fig. 6, n = 300)
PAPER_KS = (1, 4, 16, 64, 256)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem from ``n`` samples of which ``c`` are correct.

    Raises ValueError unless 0 <= c <= n and 1 <= k <= n (Pass@K needs at least K samples).
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"Pass@K needs at least one sample per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the number correct must be between 0 and n={n}, got c={c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"Pass@{k} needs K between 1 and the samples per problem n={n}; got K={k} (raise n or lower K)"
        )
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_pass_at_k(n: int, correct_counts: Sequence[int], k: int) -> float:
    """Pass@k averaged over problems (``correct_counts[i]`` correct of ``n`` for problem i)."""
    if not correct_counts:
        raise ValueError("no problems to average over")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def avg_at_k(correct: Sequence[Sequence[float]]) -> float:
    """Avg@K: mean over problems of the mean verdict (0/1) of each problem's K samples."""
    if not correct:
        raise ValueError("no problems to average over")
    per_problem = []
    for i, row in enumerate(correct):
        if not row:
            raise ValueError(f"problem {i} has no samples")
        per_problem.append(sum(float(v) for v in row) / len(row))
    return sum(per_problem) / len(per_problem)


def default_ks(n: int) -> list[int]:
    """The paper's K grid cut at n (always at least [1])."""
    return [k for k in PAPER_KS if k <= n] or [1]
