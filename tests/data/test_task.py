"""The bundled arithmetic task: row shape, seeding, disjoint splits, ground truths checked independently."""

from __future__ import annotations

import ast
import operator
import re

import pandas as pd
import pytest

from bupo.data import task
from bupo.data.datasets import data_path
from bupo.data.task import MAX_DIFFICULTY, SYSTEM_PROMPT, make_examples

PAPER_PARQUET = data_path("math500")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval_expr(text: str) -> int:
    """Independent evaluator: Python's own parser and precedence rules over + - * and integers only."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise AssertionError(f"unexpected syntax in {text!r}: {ast.dump(node)}")

    return ev(ast.parse(text, mode="eval"))


def _problem_expr(row: dict) -> str:
    m = re.fullmatch(r"Compute (.+)\.", row["prompt"][1]["content"])
    assert m, row["prompt"][1]["content"]
    return m.group(1)


def test_row_shape_matches_paper_data():
    rows = make_examples("train", 5, seed=3)
    assert SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."
    paper = pd.read_parquet(PAPER_PARQUET).iloc[0]
    # the same system prompt string as the paper's data, and the same keys
    assert rows[0]["prompt"][0]["content"] == paper["prompt"][0]["content"]
    assert set(paper.index) <= set(rows[0])
    for r in rows:
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert r["data_source"] == "bupo_arith"
        assert isinstance(r["reward_model"]["ground_truth"], str)
        assert r["extra_info"]["split"] == "train"


@pytest.mark.parametrize("difficulty", [None, 1, 2, 4, MAX_DIFFICULTY])
def test_ground_truths_are_correct(difficulty):
    n = 60 if difficulty == 1 else 150  # one-step problems are few: the test split holds ~100
    rows = make_examples("test", n, seed=11, difficulty=difficulty) + make_examples(
        "train", n, seed=12, difficulty=difficulty
    )
    for r in rows:
        expr = _problem_expr(r)
        assert r["reward_model"]["ground_truth"] == str(_eval_expr(expr)), expr
        n_ops = sum(tok in "+-*" for tok in expr.split())
        if difficulty is not None:
            assert n_ops == difficulty == r["extra_info"]["difficulty"]
        # the reference solution: every line is a correct step, each step starts from the previous result,
        # and the boxed answer is the ground truth
        lines = r["extra_info"]["solution"].split("\n")
        prev = None
        for line in lines[:-1]:
            lhs, rhs = line.split(" = ")
            assert _eval_expr(lhs) == int(rhs), line
            if prev is not None:
                assert int(lhs.split(" ")[0]) == prev
            prev = int(rhs)
            assert 0 <= prev <= task.MAX_VALUE
        assert len(lines) - 1 == n_ops
        assert lines[-1] == f"\\boxed{{{r['reward_model']['ground_truth']}}}"


def test_splits_are_disjoint_and_deterministic():
    train = make_examples("train", 3000, seed=0)
    test = make_examples("test", 600, seed=0)
    train_exprs = {_problem_expr(r) for r in train}
    test_exprs = {_problem_expr(r) for r in test}
    assert len(train_exprs) == 3000 and len(test_exprs) == 600  # distinct within a split
    assert not train_exprs & test_exprs
    # another seed draws other problems, but never crosses the split boundary either
    train2 = {_problem_expr(r) for r in make_examples("train", 3000, seed=1)}
    assert not train2 & test_exprs
    assert train2 != train_exprs
    # seeded: same arguments, same rows; a prefix of a longer call
    assert make_examples("test", 600, seed=0) == test
    assert make_examples("test", 50, seed=0) == test[:50]


def test_default_mix_and_difficulty_knob_change_length():
    rows = make_examples("train", 400, seed=5)
    diffs = {r["extra_info"]["difficulty"] for r in rows}
    assert diffs == set(task.DEFAULT_DIFFICULTY_MIX)
    easy = make_examples("train", 50, seed=5, difficulty=1)
    hard = make_examples("train", 50, seed=5, difficulty=MAX_DIFFICULTY)
    assert max(len(r["extra_info"]["solution"]) for r in easy) < min(
        len(r["extra_info"]["solution"]) for r in hard
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "validation", "n": 3}, "split must be one of"),
        ({"split": "train", "n": -1}, "n must be a non-negative int"),
        ({"split": "train", "n": 3, "difficulty": 0}, "difficulty must be None"),
        ({"split": "train", "n": 3, "difficulty": MAX_DIFFICULTY + 1}, "difficulty must be None"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_examples(**kwargs)


def test_exhausted_split_raises_value_error():
    # the test split holds 93 distinct problems of difficulty 1, so 200 cannot be had (each row costs 200 attempts)
    with pytest.raises(ValueError, match="distinct"):
        make_examples("test", 200, seed=0, difficulty=1)


def test_boxed_reward_accepts_reference_and_rejects_wrong_answer():
    from bupo.rewards import boxed_exact, extract_boxed

    for r in make_examples("test", 20, seed=2):
        sol = r["extra_info"]["solution"]
        gt = r["reward_model"]["ground_truth"]
        assert extract_boxed(sol) == gt
        assert boxed_exact(sol, gt) == 1.0
        assert boxed_exact(sol.replace(f"\\boxed{{{gt}}}", f"\\boxed{{{int(gt) + 1}}}"), gt) == 0.0
