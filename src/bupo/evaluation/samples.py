"""``samples.jsonl``: the evaluation's append-only sample log, what a rerun resumes from.

One JSON line per scored response (ASCII-escaped, so any text round-trips), appended after every generation
batch with flush + fsync: an interruption loses at most the batch in flight and at worst leaves one torn last
line, which reading skips (and counts) and appending first closes with a newline. Records are keyed by
``(benchmark, problem, sample, gen)`` (``gen``: the hash of the generation settings); the last line of a key
wins, so a re-scored sample simply appends its new verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["SAMPLES_FILE", "SampleKey", "SampleLog"]

SAMPLES_FILE = "samples.jsonl"
SampleKey = tuple[str, int, int, str]  # (benchmark, problem, sample, gen hash)


class SampleLog:
    """The sample log at ``path`` (None: nothing kept, appends are no-ops).

    ``read()`` returns what earlier runs stored; ``append(records)`` adds records durably. Use it as a context
    manager (or call ``close()``) once the run's appends are done.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f = None

    def read(self) -> tuple[dict[SampleKey, dict], int]:
        """Stored records by key (the last line wins) and the number of unreadable lines skipped."""
        records: dict[SampleKey, dict] = {}
        bad = 0
        if self.path is None or not self.path.exists():
            return records, bad
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    records[(r["benchmark"], int(r["problem"]), int(r["sample"]), r["gen"])] = r
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    bad += 1
        return records, bad

    def open(self) -> SampleLog:
        """Open for appending (creating the folder and the file); a torn last line is closed first."""
        if self.path is None or self._f is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a line cut by an earlier interruption must not swallow the next record
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held across batches)
        if needs_newline:
            self._f.write("\n")
        return self

    def append(self, records: Sequence[dict]) -> None:
        if self._f is None or not records:
            return
        # ASCII-escaped JSON: any text (lone surrogates included) round-trips
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> SampleLog:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
