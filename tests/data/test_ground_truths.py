"""Ground truths read as numbers (parquet float columns, JSON numbers) become the text a model writes; a missing one
(NaN/inf) is refused naming the row. And ``bupo eval compare`` refuses runs scored on different problems."""

from __future__ import annotations

import json
import math

import pytest

from bupo.data.datasets import load_rows, number_text, validate_rows


def _rows(gts):
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": gt}}
            for i, gt in enumerate(gts)]


@pytest.mark.parametrize("value, text", [(2, "2"), (2.0, "2"), (-3.0, "-3"), (0.5, "0.5"), (1e3, "1000"),
                                         ("2.0", "2.0")])  # a string is kept as the file wrote it
def test_numbers_become_the_text_a_model_writes(value, text):
    assert validate_rows(_rows([value]))[0]["reward_model"]["ground_truth"] == text


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_ground_truth_names_its_row(bad):
    with pytest.raises(ValueError, match=r"data\.jsonl: row 1: ground_truth is (nan|inf|-inf)") as info:
        validate_rows(_rows([1.0, bad]), "data.jsonl")
    assert "\n" not in str(info.value)


def test_a_parquet_float_column_scores_boxed_integers(tmp_path):
    """pandas reads an int column with a gap as floats: 2 -> 2.0; the reward must still see "2"."""
    pd = pytest.importorskip("pandas", reason="parquet needs pandas")
    from bupo.rewards import boxed_exact

    rows = _rows([2, 7])
    frame = pd.DataFrame({"prompt": [r["prompt"] for r in rows],
                          "reward_model": [{"ground_truth": float(r["reward_model"]["ground_truth"])} for r in rows]})
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    loaded = load_rows(path)
    assert [r["reward_model"]["ground_truth"] for r in loaded] == ["2", "7"]
    assert boxed_exact("so \\boxed{2}", loaded[0]["reward_model"]["ground_truth"]) == 1.0


def test_a_jsonl_nan_ground_truth_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows([4, float("nan")])))  # json writes NaN
    with pytest.raises(ValueError, match="row 1: ground_truth is nan"):
        load_rows(path)


def test_number_text_alone():
    assert number_text(12.0) == "12" and number_text(3) == "3" and number_text(2.5) == "2.5"
    with pytest.raises(ValueError, match="where: ground_truth is nan"):
        number_text(math.nan, "where")


# ------------------------------------------------------------------ eval compare: same problems only


def _result(problems, data="abc", avg=0.5):
    return {"settings": {"temperature": 1.0, "top_p": 1.0, "top_k": None, "max_new_tokens": 8, "template": "chat",
                         "reward": "boxed_exact", "seed": 0, "backend": "hf"},
            "benchmarks": {"math500": {"avg": avg, "n": 4, "problems": problems, "pass_at_k": {"1": avg},
                                       "truncated": 0.0, "data": data}}}


def test_compare_refuses_different_problem_counts():
    from bupo.evaluation.report import compare_table

    with pytest.raises(ValueError, match="'a' was evaluated on 500 problems, 'b' on 100"):
        compare_table([("a", _result(500)), ("b", _result(100))])


def test_compare_refuses_other_problems_of_the_same_count():
    from bupo.evaluation.report import compare_table

    with pytest.raises(ValueError, match="evaluated on different problems"):
        compare_table([("a", _result(5, "abc")), ("b", _result(5, "xyz"))])
    # the same problems (or a result from before the fingerprint) compare
    assert "| a |" in compare_table([("a", _result(5, "abc")), ("b", _result(5, "abc")), ("c", _result(5, None))])


def test_results_record_the_problems_fingerprint():
    from bupo.evaluation.results import aggregate, data_fingerprint

    rows = _rows(["1", "2"])
    records = {("b", i, 0): {"correct": 1.0, "finish_reason": "stop", "num_tokens": 3} for i in range(2)}
    out = aggregate({"b": (rows, 1, [1])}, records, {})
    assert out["b"].to_dict()["data"] == data_fingerprint(rows) != data_fingerprint(_rows(["1", "3"]))
