"""The final_number reward: last boxed number, else the last number in the text."""

from __future__ import annotations

import pytest

from bupo.rewards import STATS, final_number, make_reward_func, score_batch


@pytest.mark.parametrize(
    ("completion", "gold", "want"),
    [
        ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "14", 1.0),
        ("3 + 4 = 7, then 7 * 2 = 14. So 15", "14", 0.0),  # the LAST number counts
        ("\\boxed{12.0} and then some talk about 99", "12", 1.0),  # a box wins over later numbers
        ("The total is 1,234 apples", "1234", 1.0),
        ("It drops to -7", "-7", 1.0),
        ("10 - 3 = 7", "7", 1.0),  # "- 3" is a minus sign, not a negative number
        ("10-3", "3", 1.0),  # "-3" right after a digit is subtraction: the number is 3
        ("the answer is x3", "3", 0.0),  # part of a word, not a number
        ("no digits here", "0", 0.0),
        ("", "5", 0.0),
    ],
)
def test_final_number(completion: str, gold: str, want: float) -> None:
    assert final_number(completion, gold) == want


def test_non_numeric_gold_is_an_error_not_a_crash() -> None:
    before = STATS["final_number"].errors
    assert final_number("5", "\\frac{1}{2}") == 0.0
    assert STATS["final_number"].errors == before + 1


def test_trl_wrapper_and_batch() -> None:
    f = make_reward_func("final_number")
    assert f.__name__ == "final_number"
    out = f([[{"role": "assistant", "content": "so 8"}], "7"], reward_model=[{"ground_truth": "8"}] * 2)
    assert out == [1.0, 0.0]
    assert f.stats.calls == 2
    assert score_batch("final_number", ["1", "2"], ["1", "1"]) == [1.0, 0.0]
