"""Rows (paper parquet / JSONL / a ``datasets`` dataset / the bundled task) -> the ``datasets.Dataset`` the trainer
consumes.

Columns: ``prompt`` (the prompt *text*, rendered with one of :data:`bupo.data.templates.TEMPLATES`, so TRL tokenises
it as is), ``ground_truth`` (str, read by the reward functions) and ``data_source``. Prompts longer than
``max_prompt_length`` tokens, or leaving no room for the completion in the model's context, are dropped (verl's
``filter_overlong_prompts``; TRL 1.16 has no prompt truncation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


def load_dataset_rows(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of ``datasets.load_dataset(name, config, split=split)`` (a Hub id, a local folder or data file), or of
    ``datasets.load_from_disk`` for a folder written by ``save_to_disk``; checked like ``--data`` rows. The paper's
    sets by name (``deepmath-5k``, ...) load as with ``--data``."""
    import datasets

    from bupo.data.datasets import PAPER_DATA, load_rows, validate_rows

    if name in PAPER_DATA:
        return load_rows(name)
    p = Path(name)
    try:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"--dataset_name {name}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ValueError(f"--dataset_name {name}: not found as a local dataset folder/file nor on the Hub "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return validate_rows(ds.to_list(), f"--dataset_name {name} ({split})")


def prompt_length_limit(max_prompt_length: int | None, max_completion_length: int,
                        context: int | None) -> tuple[int | None, str]:
    """``(limit, reason)``: the longest prompt kept for training, and why.

    Prompts longer than ``max_prompt_length`` are dropped (verl's ``filter_overlong_prompts``), and so are prompts
    that leave no room for ``max_completion_length`` in the model's ``context`` (``max_position_embeddings``): a
    counted drop, since one long prompt must not stop a run over thousands. ValueError when no prompt could fit.
    """
    if context is not None and max_completion_length >= context:
        raise ValueError(f"max_completion_length {max_completion_length} leaves no room for a prompt in the model's "
                         f"max_position_embeddings {context}; lower --max_completion_length")
    room = None if context is None else context - max_completion_length
    if room is not None and (max_prompt_length is None or room < max_prompt_length):
        return room, (f"max_position_embeddings {context} - max_completion_length {max_completion_length}"
                      + ("" if max_prompt_length is None else f" < max_prompt_length {max_prompt_length}"))
    return max_prompt_length, "max_prompt_length"


@dataclass(frozen=True)
class TrainingData:
    """A run's training prompts: the rows read, the dataset built from them, and what was dropped and why."""

    spec: str  # --dataset_name, --data or "bundled", as given
    rows: list[dict]
    dataset: Any
    prompt_limit: int | None
    limit_reason: str
    dropped: int


def training_data(script: Any, tokenizer: Any, template: str, train_args: Any, context: int | None) -> TrainingData:
    """The rows of ``--dataset_name`` / ``--data`` / the bundled task (``bupo train`` keys in ``script``), rendered
    with ``template``; prompts without room in ``context`` are dropped and counted. ValueError when fewer prompts
    remain than one generation batch needs."""
    if script.dataset_name is not None:
        rows = load_dataset_rows(script.dataset_name, script.dataset_config, script.dataset_train_split)
    else:
        rows = load_training_rows(script.data, split="train", n=script.train_rows or 2048, seed=train_args.seed)
    limit, reason = prompt_length_limit(script.max_prompt_length, train_args.max_completion_length, context)
    dataset = build_prompt_dataset(rows, tokenizer, template, max_prompt_length=limit, limit=script.train_rows)
    considered = len(rows) if script.train_rows is None else min(len(rows), script.train_rows)
    dropped = considered - len(dataset)
    if dropped:
        logger.warning("dropped %d of %d training prompts longer than %s tokens (%s)", dropped, considered, limit,
                       reason)
    per_rollout = train_args.generation_batch_size // train_args.num_generations
    if len(dataset) < per_rollout:
        raise ValueError(f"the training data has {len(dataset)} usable prompts, fewer than one generation batch "
                         f"needs ({train_args.generation_batch_size} completions / num_generations "
                         f"{train_args.num_generations} = {per_rollout} prompts); give more rows or a "
                         "smaller per_device_train_batch_size x steps_per_generation")
    spec = script.dataset_name if script.dataset_name is not None else (script.data or BUNDLED)
    return TrainingData(spec, rows, dataset, limit, reason, dropped)
