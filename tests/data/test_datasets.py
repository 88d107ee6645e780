"""Loading the paper's sets (packaged, by name) and JSONL rows; validation errors; benchmark names and defaults."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from bupo.data.datasets import (
    BENCHMARKS,
    DEFAULT_SAMPLES,
    PAPER_DATA,
    benchmark_name,
    data_path,
    default_samples,
    load_benchmarks,
    load_bundled,
    load_rows,
)

SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "deepmath-5k": 5000}


@pytest.mark.parametrize(("name", "size"), SIZES.items())
def test_load_paper_parquet(name: str, size: int) -> None:
    rows = load_rows(name)
    assert len(rows) == size
    df = pd.read_parquet(data_path(name))
    for i in (0, size // 2, size - 1):
        row = rows[i]
        assert type(row["prompt"]) is list and all(type(m) is dict for m in row["prompt"])
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["prompt"][1]["content"] == df.iloc[i]["prompt"][1]["content"]
        assert row["reward_model"]["ground_truth"] == df.iloc[i]["reward_model"]["ground_truth"]
        assert row["data_source"] == df.iloc[i]["data_source"]
        json.dumps(row)  # plain Python all the way down (no numpy)


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    rows = load_rows("amc23")
    path = tmp_path / "amc23.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_rows(path) == rows
    assert benchmark_name(path) == "amc2023"


def test_numeric_ground_truth_becomes_string(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "1+1"}], "reward_model": {"ground_truth": 2}})
    )
    assert load_rows(path)[0]["reward_model"]["ground_truth"] == "2"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "no rows"),
        (
            '{"question": "q", "answer": "a"}',
            r"missing column\(s\) \['prompt', 'reward_model'\].*found columns \['answer', 'question'\]",
        ),
        (
            '{"prompt": "just text", "reward_model": {"ground_truth": "1"}}',
            "'prompt' must be a non-empty list",
        ),
        (
            '{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}',
            "string 'role' and 'content'",
        ),
        (
            '{"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}}',
            "no 'user' message",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"answer": "1"}}',
            "with 'ground_truth'",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": [1]}}',
            "must be a string",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}}\n{"prompt": 1}',
            "row 1 has no 'reward_model'",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_jsonl_validation_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_rows(path)


def test_parquet_renamed_column(tmp_path: Path) -> None:
    df = pd.read_parquet(data_path("aime24")).rename(columns={"reward_model": "reward"})
    path = tmp_path / "aime24.parquet"
    df.to_parquet(path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_model'\].*found columns .*'reward'"):
        load_rows(path)


def test_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "nope.parquet")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data format '.csv'; accepted: .parquet, .jsonl, .json"):
        load_rows(csv)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet"):
        load_rows(broken)
    js = tmp_path / "rows.json"
    js.write_text('{"prompt": []}')
    with pytest.raises(ValueError, match="must hold a list"):
        load_rows(js)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("../data/math/aime_2024.parquet", "aime_2024"),
        ("aime24.jsonl", "aime_2024"),
        ("AIME2025.parquet", "aime_2025"),
        ("aime_25.jsonl", "aime_2025"),
        ("amc2023.parquet", "amc2023"),
        ("amc23.jsonl", "amc2023"),
        ("math500.parquet", "math500"),
        ("MATH_500.jsonl", "math500"),
        ("math-500.jsonl", "math500"),
        ("deepmath-5k.parquet", "deepmath-5k"),
        ("my_set.jsonl", "my_set"),
    ],
)
def test_benchmark_name(path: str, name: str) -> None:
    assert benchmark_name(path) == name


def test_paper_defaults() -> None:
    assert BENCHMARKS == ("amc2023", "math500", "aime_2024", "aime_2025")
    assert DEFAULT_SAMPLES == {"aime_2024": 32, "aime_2025": 32, "amc2023": 16, "math500": 16}
    assert default_samples("aime_2025") == 32 and default_samples("math500") == 16
    assert default_samples("deepmath-5k") is None


def test_load_bundled() -> None:
    rows = load_bundled("test", n=5, seed=0)
    assert len(rows) == 5
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["prompt"][1]["role"] == "user"
    assert isinstance(rows[0]["reward_model"]["ground_truth"], str)
    assert load_bundled("test", n=5, seed=0) == rows


def test_load_benchmarks_names_limits_and_the_bundled_split(tmp_path: Path) -> None:
    amc = tmp_path / "amc23.jsonl"
    amc.write_text("".join(json.dumps(r) + "\n" for r in load_rows("amc23")[:5]))
    sets = load_benchmarks([str(amc), "bundled"], limit=3)
    assert list(sets) == ["amc2023", "bundled_test"]
    assert sets["amc2023"] == load_rows(amc)[:3]
    # bundled_test is always the held-out split with seed 0, whoever loads it
    assert sets["bundled_test"] == load_bundled("test", n=3, seed=0)
    assert len(load_benchmarks(["bundled"])["bundled_test"]) == 200
    assert len(load_benchmarks([str(amc)])["amc2023"]) == 5


def test_load_benchmarks_rejects_duplicate_names_and_bad_limits(tmp_path: Path) -> None:
    rows = load_rows("amc23")[:2]
    a, b = tmp_path / "amc23.jsonl", tmp_path / "AMC-2023.parquet"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(b)
    with pytest.raises(ValueError, match="both map to the benchmark name 'amc2023'"):
        load_benchmarks([str(a), str(b)])
    with pytest.raises(ValueError, match="both map to the benchmark name 'bundled_test'"):
        load_benchmarks(["bundled", "bundled"])
    with pytest.raises(ValueError, match=">= 1"):
        load_benchmarks([str(a)], limit=0)
    with pytest.raises(ValueError, match="no evaluation data"):
        load_benchmarks([])


def test_the_paper_sets_load_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").mkdir()  # a name means the packaged set, whatever the folder holds
    assert set(PAPER_DATA) == {"math500", "aime24", "aime25", "amc23", "deepmath-5k"}
    for name in PAPER_DATA:
        assert data_path(name).is_file() and data_path(name).suffix == ".parquet"
    assert data_path("math500").parent.name == "paper"
    sets = load_benchmarks(["amc23", "math500", "aime24", "aime25"], limit=2)
    assert list(sets) == ["amc2023", "math500", "aime_2024", "aime_2025"]  # the names the tables use
    assert sets["aime_2024"] == load_rows("aime24")[:2]
    assert sets["aime_2024"][0]["data_source"] == "qwen_aime_2024"
    # a path still works, and means the same rows
    copy = tmp_path / "amc23.parquet"
    copy.write_bytes(data_path("amc23").read_bytes())
    assert load_rows(copy) == load_rows("amc23") and load_rows("amc23.parquet") == load_rows("amc23")
    from bupo.training.data import load_dataset_rows  # train --dataset_name takes the names as --data does

    assert load_dataset_rows("amc23", None, "train") == load_rows("amc23")


@pytest.mark.parametrize("spec", ["mth500", "aime2024", "MATH500", "bundled"])
def test_an_unknown_name_lists_the_names(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"unknown data name '{spec}'") as info:
        load_rows(spec)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in PAPER_DATA)
    with pytest.raises(FileNotFoundError, match="data file not found.*math500, aime24"):
        load_rows(tmp_path / "sub" / "nope.parquet")  # a path that is missing stays a missing file


def test_the_packaged_files_are_the_ones_the_readme_records() -> None:
    readme = (data_path("math500").parent / "README.md").read_text()
    recorded = dict((f, h) for h, f in re.findall(r"^([0-9a-f]{64})  (\S+\.parquet)$", readme, re.M))
    assert sorted(recorded) == sorted(PAPER_DATA.values())
    for name, file in PAPER_DATA.items():
        assert hashlib.sha256(data_path(name).read_bytes()).hexdigest() == recorded[file], name
        assert f"| `{name}` | `{file}` | {SIZES[name]} |" in readme
    assert "MIT" in readme and "unknown" in readme


def test_the_presets_name_the_packaged_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bupo.training.run import parse_train_args

    monkeypatch.chdir(tmp_path)
    for preset in ("qwen3-4b", "qwen3-8b", "octothinker-3b", "octothinker-8b"):
        _, script = parse_train_args([], config=preset, cuda=False)
        assert script.data == "deepmath-5k"
        assert script.eval_data == ["aime24", "aime25", "amc23", "math500"]
        assert all(data_path(s).is_file() for s in [script.data, *script.eval_data])
