"""math-verify glue: how bupo asks math-verify whether a completion's answer equals the ground truth.

The ground truth is parsed as ``\\boxed{gt}`` (then ``$gt$``, then raw; cached) and the completion with math-verify's
default LaTeX + expression extraction (boxed answers first). math-verify's own time limits use ``signal.alarm`` and
only work in the main thread, so they are off here (``parsing_timeout=None``, ``timeout_seconds=None``): these
functions run in a reward worker process (:mod:`bupo.rewards.sandbox`), whose alarm and kill bound each call.
"""

from __future__ import annotations

from bupo.rewards.scorer import check_strings

__all__ = ["GoldUnparsable", "math_verify_raw"]


class GoldUnparsable(Exception):
    """math-verify finds no answer in the ground truth (counted as an error: no completion can match it)."""


_gold_cache: dict[str, list] = {}


def _parse_gold(ground_truth: str) -> list:
    cached = _gold_cache.get(ground_truth)
    if cached is not None:
        return cached
    from math_verify import parse

    # a bare LaTeX answer ("\frac{\pi}{2}") parses best inside \boxed{}; fall back to $...$ and raw text
    candidates = [ground_truth] if "\\boxed" in ground_truth else ["\\boxed{" + ground_truth + "}"]
    candidates += ["$" + ground_truth + "$", ground_truth]
    for text in candidates:
        gold = parse(text, parsing_timeout=None)
        if gold:
            if len(_gold_cache) > 4096:
                _gold_cache.clear()
            _gold_cache[ground_truth] = gold
            return gold
    raise GoldUnparsable(f"math-verify cannot parse the ground truth {ground_truth[:80]!r}")


def math_verify_raw(completion: str, ground_truth: str) -> float:
    """The math-verify comparison, unguarded (runs in a reward worker, under its alarm). An empty ground truth
    raises (counted as an error): math-verify would otherwise compare against nothing."""
    check_strings(completion, ground_truth)
    if not ground_truth.strip():
        raise GoldUnparsable("the ground truth is empty")
    from math_verify import parse, verify

    gold = _parse_gold(ground_truth)
    pred = parse(completion, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
