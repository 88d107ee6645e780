"""Stage 1 of an analysis: the inputs (data rows or precomputed traces) as token ids, and which ones are analysable.

Prompt and response are tokenised separately and concatenated, so the prompt/response boundary never shifts.
Data rows get one seeded response each (:func:`generate_traces`, with the prompt template applied); the
generator's own token ids are kept as they are (no decode/re-encode round trip).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bupo.analysis.config import AnalysisConfig
from bupo.generation import encode_prompt
from bupo.io import Staging

SKIP_REASONS = ("empty_response", "empty_prompt", "too_long")
GENERATED_KEY = "generated.json"  # the generated traces, staged once so that a resumed run does not generate again


@dataclass
class Trace:
    """One prompt/response pair as token ids (tokenised separately, then concatenated)."""

    index: int
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class Inputs:
    """What :func:`read_inputs` found: data rows to generate for, or precomputed prompt/response pairs."""

    rows: list | None
    trace_rows: list | None
    data_desc: str | None
    traces_desc: str | None


def read_inputs(data: Any, traces: Any, max_samples: int | None) -> Inputs:
    """Exactly one of ``data`` (a rows file or row dicts) and ``traces`` (a traces JSONL or dicts), cut to
    ``max_samples``."""
    if (data is None) == (traces is None):
        raise ValueError("give exactly one of data (rows to generate responses for) or traces (prompt/response pairs)")
    if traces is not None:
        if isinstance(traces, str | os.PathLike):
            trace_rows, desc = read_traces(traces), str(traces)
        else:
            trace_rows = list(traces)
            desc = f"<{len(trace_rows)} traces given in Python>"
        if not trace_rows:
            raise ValueError("no traces given")
        return Inputs(None, trace_rows[:max_samples], None, desc)
    if isinstance(data, str | os.PathLike):
        from bupo.data.datasets import load_rows

        rows, desc = load_rows(data), str(data)
    else:
        rows = list(data)
        desc = f"<{len(rows)} rows given in Python>"
    if not rows:
        raise ValueError(f"no data rows in {desc}")
    return Inputs(rows[:max_samples], None, desc, None)


def read_traces(path: str | os.PathLike) -> list[dict]:
    """Read a traces JSONL: one ``{"prompt": str | [messages], "response": str}`` object per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"traces file not found: {str(path)!r}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            _check_trace_row(row, f"{path}:{i}")
            rows.append(row)
    if not rows:
        raise ValueError(f"traces file {str(path)!r} holds no traces (expected JSONL with 'prompt' and 'response')")
    return rows


def _check_trace_row(row: Any, where: str) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a trace must be an object with 'prompt' and 'response', got {type(row).__name__}")
    missing = [k for k in ("prompt", "response") if k not in row]
    if missing:
        raise ValueError(f"{where}: trace is missing {missing} (found keys {sorted(row)}); accepted: "
                         "{'prompt': str or [{'role','content'}...], 'response': str}")
    if not isinstance(row["response"], str):
        raise ValueError(f"{where}: 'response' must be a string, got {type(row['response']).__name__}")
    ids = row.get("response_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError(f"{where}: 'response_ids' (optional) must be a list of token ids")


def _prompt_ids(tokenizer: Any, prompt: Any, template: str) -> list[int]:
    """Token ids of a prompt: message lists get the template; strings are taken verbatim."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, list | tuple) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt):
        from bupo.data.templates import render_prompt

        return encode_prompt(tokenizer, render_prompt(tokenizer, list(prompt), template))
    raise ValueError(
        f"prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
    )


def tokenize_traces(tokenizer: Any, traces: Sequence[Mapping], template: str = "chat") -> list[Trace]:
    """Tokenise prompt and response separately and concatenate the ids, so the boundary never shifts.

    A row's optional ``response_ids`` (e.g. from a previous run's traces.jsonl, EOS included) are used as they
    are instead of re-encoding ``response`` (whose decoded text drops special tokens).
    """
    out = []
    for i, row in enumerate(traces):
        _check_trace_row(row, f"trace {i}")
        ids = row.get("response_ids")
        # response text -> ids, no special tokens added
        resp = list(ids) if ids is not None else list(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        out.append(Trace(i, _prompt_ids(tokenizer, row["prompt"], template), resp))
    return out


def generate_traces(model, tokenizer, rows: Sequence[Mapping], *, template: str, max_new_tokens: int,
                    temperature: float, top_p: float, seed: int, batch_size: int = 32,
                    progress: bool = False, context: int | None = None, backend: str = "hf") -> list[dict]:
    """Sample one response per row with the shared seeded generator; returns trace dicts with token ids.

    Row ``i`` is seeded by its index (``prompt_keys``), so its sample does not depend on which other rows are
    generated. Prompts that leave no room for ``max_new_tokens`` in the ``context`` are not generated (empty
    response, ``finish_reason="prompt_too_long"``; counted as ``too_long`` later), as in training.
    """
    from bupo.data.templates import render_prompt
    from bupo.engines import generate
    from bupo.generation import fits_context

    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row:
            raise ValueError(f"data row {i} has no 'prompt' column (found {sorted(row) if isinstance(row, Mapping) else type(row).__name__})")
        prompts.append(render_prompt(tokenizer, list(row["prompt"]), template))
    fits = [i for i, pr in enumerate(prompts) if fits_context(len(encode_prompt(tokenizer, pr)), max_new_tokens, context)]
    completions = generate(backend, model, tokenizer, [prompts[i] for i in fits], n=1, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                           progress=progress, prompt_keys=fits) if fits else []
    by_row = {i: comps[0] for i, comps in zip(fits, completions, strict=True)}
    out = []
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        c = by_row.get(i)
        out.append({"prompt": prompt, "response": "" if c is None else c.text,
                    "response_ids": [] if c is None else [int(t) for t in c.token_ids],
                    "finish_reason": "prompt_too_long" if c is None else c.finish_reason,
                    "messages": list(row["prompt"]),
                    "ground_truth": (row.get("reward_model") or {}).get("ground_truth")})
    return out


def traces_from_generated(tokenizer: Any, gen: Sequence[Mapping]) -> list[Trace]:
    """Traces of :func:`generate_traces`' records (the generator's response ids, as they are)."""
    return [Trace(i, encode_prompt(tokenizer, g["prompt"]), list(g["response_ids"])) for i, g in enumerate(gen)]


def collect_traces(model, tokenizer, inputs: Inputs, cfg: AnalysisConfig, staging: Staging | None,
                   context: int | None) -> tuple[list[Trace], list[dict]]:
    """The token ids of every input (generated once and staged, or tokenised) and their trace records."""
    if inputs.rows is not None:
        gen = None if staging is None else staging.read_json(GENERATED_KEY)
        if gen is None:
            gen = generate_traces(model, tokenizer, inputs.rows, template=cfg.template,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed, batch_size=cfg.gen_batch_size, progress=cfg.progress,
                                  context=context, backend=cfg.backend)
            if staging is not None:
                staging.write_json(GENERATED_KEY, gen)
        return traces_from_generated(tokenizer, gen), gen
    all_traces = tokenize_traces(tokenizer, inputs.trace_rows, cfg.template)
    records = [{**r, "response_ids": tr.response_ids} for r, tr in zip(inputs.trace_rows, all_traces, strict=True)]
    return all_traces, records


def select_traces(all_traces: Sequence[Trace], context: int | None,
                  records: Sequence[Mapping] | None = None) -> tuple[list[Trace], dict[int, str]]:
    """The analysable traces and the skip reason of every other one (see ``SKIP_REASONS``); ``records``: the
    generated trace records, whose ``finish_reason="prompt_too_long"`` marks prompts left ungenerated."""
    todo: list[Trace] = []
    skip_reason: dict[int, str] = {}
    for tr in all_traces:
        if context is not None and len(tr.prompt_ids) >= context:
            skip_reason[tr.index] = "too_long"  # the prompt alone fills the context
        elif records is not None and records[tr.index].get("finish_reason") == "prompt_too_long":
            skip_reason[tr.index] = "too_long"  # no room for max_new_tokens: not generated
        elif not tr.response_ids:
            skip_reason[tr.index] = "empty_response"
        elif not tr.prompt_ids:
            skip_reason[tr.index] = "empty_prompt"  # nothing predicts the first response token
        elif context is not None and len(tr.prompt_ids) + len(tr.response_ids) > context:
            skip_reason[tr.index] = "too_long"
        else:
            todo.append(tr)
    if not todo:
        raise ValueError(f"no analysable samples among {len(all_traces)}: skipped {dict(Counter(skip_reason.values()))} "
                         f"(context length {context})")
    return todo, skip_reason
