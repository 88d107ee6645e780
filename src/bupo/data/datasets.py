"""Load the paper's parquet files (and JSONL with the same fields) as plain Python rows.

A row is a dict with at least ``prompt: list[{"role", "content"}]`` (system + user in the paper's
files) and ``reward_model: {"ground_truth": str, ...}``; ``data_source`` and every other column are
kept as they are (numpy arrays and scalars from pyarrow become lists and Python scalars).

The paper's five sets ship with the package (``bupo/data/paper/``, sources and licences in its README.md) and go
by name wherever a data file is accepted, from any folder: ``math500``, ``aime24``, ``aime25``, ``amc23`` (evaluation)
and ``deepmath-5k`` (training). :func:`data_path` is the one place that turns a name into its file.

Benchmark names and the paper's default samples per problem (Avg@K): AIME24/25 32, AMC23 and
MATH500 16. The bundled synthetic task's held-out split loads as ``bundled_test``.

:func:`load_benchmarks` is the one mapping from data specs to ``{benchmark_name: rows}`` shared by ``bupo eval`` and
the evaluation inside ``bupo train``, so the same name always means the same problems.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "BUNDLED",
    "BUNDLED_TEST",
    "BUNDLED_TEST_PROBLEMS",
    "BUNDLED_TEST_SEED",
    "DEFAULT_SAMPLES",
    "DISPLAY_NAMES",
    "PAPER_DATA",
    "REQUIRED_COLUMNS",
    "benchmark_name",
    "data_path",
    "default_samples",
    "load_benchmarks",
    "load_bundled",
    "load_rows",
    "validate_rows",
]

REQUIRED_COLUMNS = ("prompt", "reward_model")
# the paper's Table 1 column order
BENCHMARKS = ("amc2023", "math500", "aime_2024", "aime_2025")
DISPLAY_NAMES = {"amc2023": "AMC", "math500": "MATH500", "aime_2024": "AIME24", "aime_2025": "AIME25"}
DEFAULT_SAMPLES = {"aime_2024": 32, "aime_2025": 32, "amc2023": 16, "math500": 16}
BUNDLED = "bundled"  # the data spec naming the bundled task
BUNDLED_TEST = "bundled_test"
BUNDLED_TEST_PROBLEMS = 200  # problems of bundled_test when no limit is given
BUNDLED_TEST_SEED = 0  # one seed wherever bundled_test is evaluated, so results under that name compare
_SUFFIXES = (".parquet", ".jsonl", ".json")
# the paper's sets by name -> the packaged file (byte-identical to the official repository's data/ folder)
PAPER_DATA = {
    "math500": "math500.parquet",
    "aime24": "aime_2024.parquet",
    "aime25": "aime_2025.parquet",
    "amc23": "amc2023.parquet",
    "deepmath-5k": "deepmath-5k.parquet",
}
_PAPER_DIR = Path(__file__).resolve().parent / "paper"
_NAMES_HINT = f"the paper's sets go by name: {', '.join(PAPER_DATA)}"

_ALIASES = [
    (re.compile(r"^(qwen_)?aime_?(20)?24$"), "aime_2024"),
    (re.compile(r"^(qwen_)?aime_?(20)?25$"), "aime_2025"),
    (re.compile(r"^(qwen_)?amc_?(20)?23$"), "amc2023"),
    (re.compile(r"^(qwen_)?math_?500$"), "math500"),
]


def benchmark_name(path: str | Path) -> str:
    """Canonical benchmark name of a data file: "aime_2024", "aime_2025", "amc2023", "math500", or the
    file's stem for anything else (``aime24.jsonl`` -> "aime_2024", ``deepmath-5k.parquet`` -> "deepmath-5k")."""
    stem = Path(path).name
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    key = stem.lower().replace("-", "_")
    for pattern, name in _ALIASES:
        if pattern.match(key):
            return name
    return stem


def default_samples(benchmark: str) -> int | None:
    """The paper's samples per problem for Avg@K (AIME 32, AMC/MATH500 16); None if it sets none."""
    return DEFAULT_SAMPLES.get(benchmark)


def _to_python(value: Any) -> Any:
    """numpy arrays / scalars (as pyarrow hands them to pandas) -> lists / Python scalars, recursively."""
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_python(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if tolist is not None and type(value).__module__ == "numpy":
        return _to_python(tolist())
    return value


def _expected_message() -> str:
    return (
        "expected columns 'prompt' (a list of {'role', 'content'} messages) and 'reward_model' "
        "(a dict with 'ground_truth'); 'data_source' optional"
    )


def number_text(x: int | float, where: str = "ground_truth") -> str:
    """A numeric ground truth as the text a model writes: ``2`` and ``2.0`` -> ``"2"`` (a parquet column of ints
    with a gap is read as floats; ``"2.0"`` would score ``\\boxed{2}`` as wrong), ``0.5`` -> ``"0.5"``. NaN/inf
    (a missing answer) is a ValueError naming ``where``."""
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"{where}: ground_truth is {x} (a missing answer?); every row needs a finite reference "
                             "answer")
        if x.is_integer():
            return str(int(x))
    return str(x)


def validate_rows(rows: list[dict], source: str = "rows") -> list[dict]:
    """Check the row contract; returns the rows (ground truths given as numbers become strings).

    Raises ValueError naming the first bad row, what was wrong and what is expected.
    """
    if not rows:
        raise ValueError(f"{source}: no rows (empty file?); {_expected_message()}")
    first = rows[0]
    if not isinstance(first, dict):
        raise ValueError(f"{source}: rows must be objects/dicts, got {type(first).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in first]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; {_expected_message()}; found columns {sorted(first)}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is {type(row).__name__}, not an object")
        for c in REQUIRED_COLUMNS:
            if c not in row:
                raise ValueError(f"{source}: row {i} has no {c!r}; found keys {sorted(row)}")
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(
                f"{source}: row {i}: 'prompt' must be a non-empty list of {{'role', 'content'}} messages, "
                f"got {type(prompt).__name__}: {prompt!r:.100}"
            )
        for j, m in enumerate(prompt):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{source}: row {i}: prompt message {j} must be a dict with string 'role' and "
                    f"'content', got {m!r:.100}"
                )
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(
                f"{source}: row {i}: the prompt has no 'user' message (roles {[m['role'] for m in prompt]})"
            )
        if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
            # a blank question still renders and trains on a prompt made of the template alone
            raise ValueError(f"{source}: row {i}: the 'user' message is empty; every row needs a question")
        rm = row["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise ValueError(
                f"{source}: row {i}: 'reward_model' must be a dict with 'ground_truth', got {rm!r:.100}"
            )
        gt = rm["ground_truth"]
        if isinstance(gt, bool) or not isinstance(gt, str | int | float):
            raise ValueError(f"{source}: row {i}: ground_truth must be a string, got {type(gt).__name__}")
        if not isinstance(gt, str):
            row["reward_model"] = {**rm, "ground_truth": number_text(gt, f"{source}: row {i}")}
        elif not gt.strip():
            # an empty answer would make "\\boxed{}" score 1.0
            raise ValueError(f"{source}: row {i}: ground_truth is empty; every row needs the reference answer")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    # to_pylist gives plain lists/dicts directly (no numpy arrays); _to_python is a no-op safety net
    return [_to_python(r) for r in table.to_pylist()]


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> ValueError:
    line = data.count(b"\n", 0, exc.start) + 1
    return ValueError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                      "save the file as UTF-8")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    # split on \n only: str.splitlines would also split inside strings holding U+2028 and the like
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line"
            ) from exc
    return rows


def data_path(spec: str | os.PathLike) -> Path:
    """The file a data spec means: a name of :data:`PAPER_DATA` gives its packaged parquet (a name always means
    that file, whatever the current folder holds); anything else is a path, returned as given.

    Raises ValueError for a bare word (no folder, no suffix) that is neither a name nor an existing file, listing
    the names.
    """
    text = os.fspath(spec)
    if text in PAPER_DATA:
        return _PAPER_DIR / PAPER_DATA[text]
    p = Path(text)
    if not p.exists() and not p.suffix and p.name == text:
        raise ValueError(f"unknown data name {text!r}; {_NAMES_HINT}; or give a .parquet, .jsonl or .json file")
    return p


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.parquet`` or ``.jsonl`` file (a ``.json`` file holding a list also works), or of one of the
    paper's sets by name (:func:`data_path`), validated.

    Raises FileNotFoundError for a missing file and ValueError for an unknown name, an unsupported format, an
    empty file, missing/renamed columns or a malformed prompt.
    """
    p = data_path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p} ({_NAMES_HINT})")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; give a data file (.parquet, .jsonl or .json)")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(p)
    elif suffix == ".jsonl":
        rows = _read_jsonl(p)
    elif suffix == ".json":
        try:
            data = json.loads(_read_text(p))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, list):
            raise ValueError(f"{p}: a .json data file must hold a list of rows, got {type(data).__name__}")
        rows = data
    else:
        raise ValueError(
            f"{p}: unsupported data format {suffix or '(no suffix)'!r}; accepted: .parquet, .jsonl, .json"
        )
    return validate_rows(rows, str(p))


def load_bundled(
    split: str = "test", n: int = 200, seed: int = 0, difficulty: int | None = None
) -> list[dict]:
    """Rows of the bundled synthetic task (``bupo.data.task.make_examples``), validated."""
    from bupo.data.task import make_examples  # lazy: written by the task module's owner

    return validate_rows(make_examples(split, n, seed, difficulty), f"bundled task ({split})")


def load_benchmarks(specs: list[str], limit: int | None = None) -> dict[str, list[dict]]:
    """``{benchmark_name: rows}`` for data specs: the paper's sets by name (``math500``, ``aime24``, ...),
    ``.parquet`` / ``.jsonl`` / ``.json`` files (named by :func:`benchmark_name`) or ``"bundled"`` (the bundled task's held-out split as ``bundled_test``:
    ``limit`` or :data:`BUNDLED_TEST_PROBLEMS` problems, seed :data:`BUNDLED_TEST_SEED`).

    ``limit``: at most this many problems per benchmark (the first ones); None keeps every row.
    Raises ValueError for no specs, a limit below 1, or two specs mapping to the same benchmark name (one would
    silently replace the other); FileNotFoundError / ValueError from :func:`load_rows` for a bad file.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"the problem limit must be >= 1, got {limit}")
    if not specs:
        raise ValueError(f"no evaluation data given; pass data files (.parquet/.jsonl/.json), {BUNDLED!r} or the "
                         f"paper's sets by name ({', '.join(PAPER_DATA)})")
    out: dict[str, list[dict]] = {}
    origin: dict[str, str] = {}
    for spec in specs:
        spec = str(spec)
        name = BUNDLED_TEST if spec == BUNDLED else benchmark_name(spec)
        if name in out:
            raise ValueError(f"{origin[name]!r} and {spec!r} both map to the benchmark name {name!r}; "
                             "rename one file (names come from the file name, see benchmark_name)")
        if spec == BUNDLED:
            rows = load_bundled("test", n=limit or BUNDLED_TEST_PROBLEMS, seed=BUNDLED_TEST_SEED)
        else:
            rows = load_rows(spec)
        out[name], origin[name] = (rows[:limit] if limit else rows), spec
    return out
