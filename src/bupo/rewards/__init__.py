"""Rewards for math reasoning: the paper's boxed exact-match scorer and a math-verify scorer.

Plain callables ``boxed_exact(completion, ground_truth)``, ``math_verify_reward(completion, ground_truth)`` and
``final_number(completion, ground_truth)`` (last number; for small models),
each returning 1.0 or 0.0, plus TRL-style batch wrappers built by :func:`make_reward_func`. No call ever raises or
hangs: an exception scores 0.0 and counts as an ``error``, a call over its time limit (default 5 s) as a ``timeout``
(:class:`RewardStats`: one per reward name in :data:`STATS`, one per wrapper as ``func.stats``).

The package:

- :mod:`bupo.rewards.scorer` — the paper's scorer (verl's ``compute_score``: last ``\\boxed{}``, Hendrycks
  ``strip_string`` normalisation, exact match), in-process;
- :mod:`bupo.rewards.mathverify` — the math-verify glue (how the ground truth and the completion are parsed);
- :mod:`bupo.rewards.sandbox` — the worker processes (pebble) that run math-verify under an alarm and kill a stuck
  call: one rollout of n completions costs at most about ``(limit + 2 s) * n / workers``, workers = CPU cores;
- :mod:`bupo.rewards.api` — the registry (:data:`REWARDS`: name -> callable; :func:`parse_rewards`), ``score`` /
  ``score_batch`` by name, the callables, the TRL wrappers, the counters; train, eval, reproduce and the Python API
  all look names up there;
- :mod:`bupo.rewards.recorded` — the reward a trained model's ``bupo_run.json`` records (``bupo eval``'s default).
"""

from __future__ import annotations

from bupo.rewards.api import (
    DEFAULT_TIMEOUT,
    REWARD_NAMES,
    REWARDS,
    STATS,
    RewardStats,
    boxed_exact,
    final_number,
    make_reward_func,
    math_verify_reward,
    parse_rewards,
    score,
    score_batch,
)
from bupo.rewards.recorded import DEFAULT_REWARD, choose_reward, recorded_reward
from bupo.rewards.scorer import extract_boxed, is_equiv, normalize_answer

__all__ = [
    "DEFAULT_REWARD",
    "DEFAULT_TIMEOUT",
    "REWARDS",
    "REWARD_NAMES",
    "STATS",
    "RewardStats",
    "boxed_exact",
    "choose_reward",
    "extract_boxed",
    "final_number",
    "is_equiv",
    "make_reward_func",
    "math_verify_reward",
    "normalize_answer",
    "parse_rewards",
    "recorded_reward",
    "score",
    "score_batch",
]
