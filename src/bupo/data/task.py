"""The bundled synthetic reasoning task: multi-step integer arithmetic with a boxed final answer.

Each problem is a chain of ``difficulty`` operations applied left to right to a starting number,
written as an ordinary arithmetic expression (parentheses only where precedence needs them), e.g.
``Compute (23 + 7 - 4) * 3 - 9.``. The reference solution evaluates it one step per line and ends
with ``\\boxed{69}``, so intermediate steps matter: one wrong step makes the final answer wrong.

Rows have the same shape as the paper's parquet data (``prompt`` = system + user messages with the
paper's system prompt, ``reward_model.ground_truth``), so the same loaders, templates and rewards
serve both.

Conventions:
- ``difficulty`` = number of operations (= solution steps), an int in ``[1, MAX_DIFFICULTY]``;
  ``difficulty=None`` draws each problem's difficulty from ``DEFAULT_DIFFICULTY_MIX``.
- Operations: ``+ b`` (b in 2..9), ``- b`` (b in 2..9, never below 0), ``* b`` (b in 2..9, result
  at most ``MAX_VALUE``); every intermediate value is an integer in ``[0, MAX_VALUE]``.
- Train and test splits are disjoint by construction: a problem belongs to ``test`` iff the
  SHA-256 of its canonical expression falls in the held-out bucket (1 in ``TEST_BUCKETS``).
- Generation is seeded and platform-independent (``random.Random`` with a string seed).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_SOURCE = "bupo_arith"
SPLITS = ("train", "test")
MAX_DIFFICULTY = 6
# the default mix: mostly 2-4 step problems (calibrated with the bundled model; see its model card)
DEFAULT_DIFFICULTY_MIX: tuple[int, ...] = (2, 3, 3, 4)
MAX_VALUE = 99
TEST_BUCKETS = 10  # 1 problem in 10 (by hash) is held out
_START_RANGE = (2, 60)
_ADDSUB_RANGE = (2, 9)
_MUL_RANGE = (2, 9)
_MAX_ATTEMPTS_PER_ROW = 200


@dataclass(frozen=True)
class Problem:
    """One generated problem: the start value and the chain of (op, operand) steps."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    def expression(self) -> str:
        """The canonical expression, with parentheses exactly where left-to-right order needs them."""
        expr = str(self.start)
        top_addsub = False  # whether the expression so far has + or - at its top level
        for op, b in self.ops:
            if op == "*" and top_addsub:
                expr = f"({expr})"
            expr = f"{expr} {op} {b}"
            top_addsub = op in "+-"
        return expr

    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(a, op, b, result)`` per step, evaluated left to right."""
        out = []
        cur = self.start
        for op, b in self.ops:
            res = _apply(cur, op, b)
            out.append((cur, op, b, res))
            cur = res
        return out

    def answer(self) -> int:
        return self.steps()[-1][3]

    def problem_text(self) -> str:
        return f"Compute {self.expression()}."

    def solution_text(self) -> str:
        return format_solution(self.steps())


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operation {op!r}; accepted: '+', '-', '*'")


def format_solution(steps: list[tuple[int, str, int, int]]) -> str:
    """One line per step (``a op b = r``), then the boxed final result (the last step's ``r``)."""
    lines = [f"{a} {op} {b} = {r}" for a, op, b, r in steps]
    lines.append(f"\\boxed{{{steps[-1][3]}}}")
    return "\n".join(lines)


def split_of(expression: str) -> str:
    """The split a problem belongs to, from the hash of its canonical expression."""
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def _random_problem(rng: random.Random, difficulty: int) -> Problem:
    start = cur = rng.randint(*_START_RANGE)
    ops: list[tuple[str, int]] = []
    while len(ops) < difficulty:
        op = rng.choice("+-*")
        if op == "*":
            b = rng.randint(*_MUL_RANGE)
            if cur * b > MAX_VALUE or cur == 0:
                continue
        elif op == "+":
            b = rng.randint(*_ADDSUB_RANGE)
            if cur + b > MAX_VALUE:
                continue
        else:
            b = rng.randint(*_ADDSUB_RANGE)
            if cur - b < 0:
                continue
        ops.append((op, b))
        cur = _apply(cur, op, b)
    return Problem(start, tuple(ops))


def _validate(split: str, n: int, difficulty: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if difficulty is not None and (
        not isinstance(difficulty, int)
        or isinstance(difficulty, bool)
        or not 1 <= difficulty <= MAX_DIFFICULTY
    ):
        raise ValueError(
            f"difficulty must be None (default mix) or an int in 1..{MAX_DIFFICULTY}, got {difficulty!r}"
        )


def generate_problems(split: str, n: int, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    """``n`` distinct problems of ``split``, deterministic in ``(split, n, seed, difficulty)``.

    The first ``m`` problems of a call with ``n >= m`` equal the problems of a call with ``n = m``.
    Raises ValueError if the split does not hold ``n`` distinct problems of that difficulty.
    """
    _validate(split, n, difficulty)
    rng = random.Random(f"bupo_arith:{seed}:{split}:{difficulty}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_ROW * (n + 10):
            raise ValueError(
                f"could only generate {len(out)} distinct {split!r} problems of difficulty {difficulty}; ask for fewer"
            )
        d = difficulty if difficulty is not None else rng.choice(DEFAULT_DIFFICULTY_MIX)
        prob = _random_problem(rng, d)
        expr = prob.expression()
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        out.append(prob)
    return out


def to_row(prob: Problem, split: str, index: int) -> dict[str, Any]:
    """The dataset row (paper parquet shape) for one problem."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prob.problem_text()},
        ],
        "ability": "arithmetic",
        "reward_model": {"ground_truth": str(prob.answer()), "style": "rule"},
        "extra_info": {
            "split": split,
            "index": index,
            "difficulty": prob.difficulty,
            "expression": prob.expression(),
            "solution": prob.solution_text(),
        },
    }


def make_examples(split: str, n: int, seed: int = 0, difficulty: int | None = None) -> list[dict[str, Any]]:
    """``n`` rows of the bundled arithmetic task.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint by construction).
        n: number of rows (distinct problems).
        seed: generation seed; same arguments give the same rows on every platform.
        difficulty: number of operations (1..``MAX_DIFFICULTY``), or None for ``DEFAULT_DIFFICULTY_MIX``.

    Returns:
        Rows ``{"data_source", "prompt": [system, user], "ability", "reward_model": {"ground_truth"},
        "extra_info": {"split", "index", "difficulty", "expression", "solution"}}``.
    """
    return [to_row(p, split, i) for i, p in enumerate(generate_problems(split, n, seed, difficulty))]
