"""Rows (paper parquet / JSONL / the bundled task) -> the ``datasets.Dataset`` the trainer consumes.

Columns: ``prompt`` (the prompt *text*, rendered with one of :data:`bupo.data.templates.TEMPLATES`, so TRL tokenises
it as is), ``ground_truth`` (str, read by the reward functions) and ``data_source``. Prompts longer than
``max_prompt_length`` tokens are dropped (verl's ``filter_overlong_prompts``; TRL 1.16 has no prompt truncation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from bupo.data.datasets import BUNDLED  # re-exported: the spec naming the bundled task

logger = logging.getLogger(__name__)


def load_training_rows(spec: str | None, *, split: str = "train", n: int = 2048, seed: int = 0) -> list[dict]:
    """Rows from a ``.parquet`` / ``.jsonl`` / ``.json`` file, or ``n`` rows of the bundled task's ``split``
    generated with ``seed`` (``spec`` None or ``"bundled"``)."""
    from bupo.data.datasets import load_bundled, load_rows

    if spec is None or spec == BUNDLED:
        return load_bundled(split, n=n, seed=seed)
    return load_rows(spec)


def _strip_auto_bos(tokenizer: Any, text: str) -> str:
    # A chat template that writes BOS itself, tokenised by a tokenizer that adds BOS too, would start with two BOS.
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    ids = tokenizer("x")["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        return text[len(bos):]
    return text


def build_prompt_dataset(
    rows: Sequence[dict],
    tokenizer: Any,
    template: str,
    *,
    max_prompt_length: int | None = None,
    limit: int | None = None,
) -> Any:
    """A ``datasets.Dataset`` with ``prompt`` (rendered text), ``ground_truth`` and ``data_source`` columns.

    Raises ValueError for an unknown template, malformed rows, or when no prompt fits ``max_prompt_length``.
    """
    from datasets import Dataset

    from bupo.data.datasets import validate_rows
    from bupo.data.templates import render_prompt

    rows = validate_rows(list(rows), "training rows")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    prompts, gts, sources = [], [], []
    dropped = 0
    for row in rows:
        text = _strip_auto_bos(tokenizer, render_prompt(tokenizer, row["prompt"], template))
        if max_prompt_length is not None and len(tokenizer(text)["input_ids"]) > max_prompt_length:
            dropped += 1
            continue
        prompts.append(text)
        gts.append(str(row["reward_model"]["ground_truth"]))
        sources.append(str(row.get("data_source", "")))
    if dropped:
        logger.warning("dropped %d of %d prompts longer than max_prompt_length=%s tokens", dropped, len(rows),
                       max_prompt_length)
    if not prompts:
        raise ValueError(f"no prompt is at most max_prompt_length={max_prompt_length} tokens long")
    return Dataset.from_dict({"prompt": prompts, "ground_truth": gts, "data_source": sources})
