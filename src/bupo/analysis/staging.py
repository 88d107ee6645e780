"""Resumable measurement: the token columns of every measured batch, kept until the analysis is published.

On disk (an analysis with an ``out_dir``) each batch is one Parquet shard in the run's partial folder
(:class:`bupo.io.Staging`, ``.bupo_analyze_partial``) plus a small index file written after it, so a shard counts
as done only once both exist; a rerun with the same fingerprint measures only the samples no shard holds. Without
an ``out_dir`` the blocks stay in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from bupo.io import Staging, atomic_path, atomic_write_text

STAGING_DIR = ".bupo_analyze_partial"


class Shards:
    """One block of token columns (``{column: array}``, samples contiguous and in order) per measured batch."""

    def __init__(self, staging: Staging | None):
        self.staging = staging
        self.mem: list[dict[str, np.ndarray]] = []

    def done(self) -> set[int]:
        """The sample indices already measured (by this run or by the run it resumes)."""
        if self.staging is None:
            return {int(i) for b in self.mem for i in np.unique(b["sample"])}
        out = set()
        for f in self.staging.dir.glob("shard_*.json"):
            out.update(json.loads(f.read_text())["samples"])
        return out

    def put(self, block: dict[str, np.ndarray]) -> None:
        if self.staging is None:
            self.mem.append(block)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        idx = [int(i) for i in np.unique(block["sample"])]
        name = f"shard_{idx[0]:07d}"
        with atomic_path(self.staging.dir / f"{name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pydict(block), tmp)
        # the index file is written after the data: a shard counts as done only once both exist
        atomic_write_text(self.staging.dir / f"{name}.json", json.dumps({"samples": idx}))

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """Every staged block's columns, in sample order (batches cover increasing, disjoint sample ranges)."""
        if self.staging is None:
            yield from sorted(self.mem, key=lambda b: int(b["sample"][0]))
            return
        import pyarrow.parquet as pq

        for f in sorted(self.staging.dir.glob("shard_*.json")):
            t = pq.read_table(f.with_suffix(".parquet"))
            yield {c: t.column(c).to_numpy() for c in t.column_names}
