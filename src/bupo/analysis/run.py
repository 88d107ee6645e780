"""``bupo analyze`` as a Python API: internal-policy entropy flow over reasoning traces.

Pipeline: rows (paper parquet / JSONL / the bundled task) -> seeded generation with the chat template, or
precomputed traces -> one hooked forward per batch (:func:`bupo.internal.streams.stream_stats`, chunked fp32
statistics computed inside the hooks: never more than ``chunk_size`` x vocab logits, whatever the number of
layers) -> per-token columns (Parquet) + streaming per-layer summaries -> boundary layer, figures, report.

Conventions (all recorded in ``summary.json``):

- **Positions.** Position ``t`` of a sequence holds the distribution that predicts token ``t + 1``. For a
  prompt of ``P`` tokens and a response of ``R`` tokens we analyse the ``R`` positions ``P-1 .. P+R-2``,
  i.e. every position whose prediction is a response token, and record the log-prob of that realised token.
  (The official script starts one position later and includes the position after the last response token.)
- **Layers** 0-based ``k`` in token columns, paper layer ``l = k + 1``; summary lists have element ``i`` = layer
  ``i + 1``. ``boundary_layer`` is 1-based, ``suggested_internal_layer = boundary_layer - 1`` is 0-based.
- **Projection** ``raw`` = lm_head(h) (paper, default) or ``final_norm`` = lm_head(final_norm(h)); both with the
  model's softcap. ``final_entropy`` is always the model's real policy lm_head(final_norm(h_L)).
- **ΔH convention** ``bupo`` (paper / official script) or ``residual``; see :mod:`bupo.analysis.summary`.
- Entropies in nats.

Outputs are written atomically; ``summary.json`` is written last, so a directory without it is an unfinished
run, which the next call with the same settings resumes from its staged per-batch shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bupo.analysis.summary import (
    CONVENTION_STREAMS,
    DEFAULT_BOUNDARY_TOL,
    Aggregator,
    boundary_details,
    boundary_record,
    check_convention,
    entropy_col,
    projection_health,
)
from bupo.generation import encode_prompt
from bupo.io import atomic_path, atomic_write_json, atomic_write_text

SUMMARY_FILE = "summary.json"
TOKENS_FILE = "tokens.parquet"
TRACES_FILE = "traces.jsonl"
REPORT_FILE = "report.html"
STAGING_DIR = ".bupo_analyze_partial"
POSITION_CONVENTION = (
    "position t predicts token t+1; analysed positions are P-1 .. P+R-2 for a P-token prompt and an R-token "
    "response (every position whose prediction is a response token); logp = log-prob of that realised token"
)
TOKEN_DTYPES = ("float16", "float32")
SKIP_REASONS = ("empty_response", "empty_prompt", "too_long")


@dataclass
class Trace:
    """One prompt/response pair as token ids (tokenised separately, then concatenated)."""

    index: int
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class AnalysisResult:
    """What :func:`analyze` returns.

    ``summary`` is the dict written to ``summary.json``; ``tokens`` the per-token table (one row per analysed
    position: ``sample``, ``position``, ``response_index``, ``token_id`` and the ``H.*`` / ``logp.*`` / ``top1.*``
    columns, see :mod:`bupo.analysis.summary`), loaded from ``tokens.parquet`` when it is not held in memory.
    """

    summary: dict
    out_dir: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    _tokens: Any = None

    @property
    def tokens(self):
        if self._tokens is None:
            if self.out_dir is None:
                raise ValueError("no per-token data: the analysis was run with keep_tokens=False and no out_dir")
            import pandas as pd

            self._tokens = pd.read_parquet(self.out_dir / TOKENS_FILE)
        return self._tokens

    @property
    def num_layers(self) -> int:
        return int(self.summary["num_layers"])

    @property
    def boundary_layer(self) -> int | None:
        return self.summary["boundary_layer"]

    @property
    def suggested_internal_layer(self) -> int | None:
        return self.summary["suggested_internal_layer"]

    def entropy(self, stream: str, layer: int) -> np.ndarray:
        """Per-token entropies (nats) of ``stream`` at 0-based ``layer``, over all analysed tokens."""
        if stream == "resid_pre" and layer > 0:
            stream, layer = "resid_post", layer - 1
        col = entropy_col(stream, layer)
        if col not in self.tokens:
            raise ValueError(f"no column {col!r}: streams recorded for convention {self.summary['delta_convention']!r}")
        return self.tokens[col].to_numpy(dtype=np.float32)

    def layer_entropy_matrix(self, sample: int) -> np.ndarray:
        """[L, n] per-token layer-policy entropies of one sample (row k = 0-based layer k)."""
        t = self.tokens[self.tokens["sample"] == sample]
        if len(t) == 0:
            raise ValueError(f"sample {sample} has no analysed tokens (skipped or out of range)")
        return _layer_matrix(t, self.num_layers)


def _layer_matrix(cols: Mapping[str, Any], num_layers: int) -> np.ndarray:
    """[L, n] float32 layer-policy entropies (row k = 0-based layer k) of one sample's token columns."""
    return np.stack([np.asarray(cols[entropy_col("resid_post", k)], dtype=np.float32) for k in range(num_layers)])


# ---------------------------------------------------------------------------------------------------------------
# inputs


def load_model(path: str | os.PathLike, *, dtype: str = "auto", device: str = "auto"):
    """Load ``--model`` (a bupo name, local folder or Hub id, :func:`bupo.models.resolve_model`) and its
    tokenizer; returns (model, tokenizer). ``dtype="auto"``: the checkpoint's own dtype (its config's ``dtype``,
    transformers' ``dtype="auto"``; float32 when the config names none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.models import resolve_model

    path = Path(resolve_model(path))
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(dtypes)}")
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[dtype]).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps")
    return device


def _encode(tokenizer, text: str) -> list[int]:
    """Response text -> ids, no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, prompt: Any, template: str) -> list[int]:
    """Token ids of a prompt: message lists get the template; strings are taken verbatim."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, list | tuple) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt):
        from bupo.data.templates import render_prompt

        return encode_prompt(tokenizer, render_prompt(tokenizer, list(prompt), template))
    raise ValueError(
        f"prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
    )


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


def tokenize_traces(tokenizer, traces: Sequence[Mapping], template: str = "chat") -> list[Trace]:
    """Tokenise prompt and response separately and concatenate the ids, so the boundary never shifts.

    A row's optional ``response_ids`` (e.g. from a previous run's traces.jsonl, EOS included) are used as they
    are instead of re-encoding ``response`` (whose decoded text drops special tokens).
    """
    out = []
    for i, row in enumerate(traces):
        _check_trace_row(row, f"trace {i}")
        ids = row.get("response_ids")
        resp = list(ids) if ids is not None else _encode(tokenizer, row["response"])
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


def traces_from_generated(tokenizer, gen: Sequence[Mapping]) -> list[Trace]:
    # the generator's own response ids are kept as they are (no decode/re-encode round trip)
    return [Trace(i, encode_prompt(tokenizer, g["prompt"]), list(g["response_ids"])) for i, g in enumerate(gen)]


# ---------------------------------------------------------------------------------------------------------------
# the measurement


def streams_for(convention: str) -> tuple[str, ...]:
    """Streams to capture: the convention's streams plus resid_pre (only its layer-0 copy is projected)."""
    return ("resid_pre", *CONVENTION_STREAMS[check_convention(convention)])


def _batches(traces: Sequence[Trace], batch_tokens: int) -> Iterator[list[Trace]]:
    batch: list[Trace] = []
    longest = 0
    for tr in traces:
        n = len(tr.prompt_ids) + len(tr.response_ids)
        if batch and max(longest, n) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(tr)
        longest = max(longest, n)
    if batch:
        yield batch


def measure_batch(model, batch: Sequence[Trace], *, convention: str, projector, chunk_size: int | None,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Token columns of a batch of traces (right-padded, one hooked forward): one row per analysed position,
    samples in batch order, each sample's rows contiguous."""
    import torch

    from bupo.internal import parts, tap
    from bupo.internal.streams import stream_stats

    device = next(model.parameters()).device
    T = max(len(t.prompt_ids) + len(t.response_ids) for t in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.bool)
    for b, tr in enumerate(batch):
        seq = tr.prompt_ids + tr.response_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
        P, R = len(tr.prompt_ids), len(tr.response_ids)
        pos[b, P - 1 : P + R - 1] = True
    targets = torch.roll(ids, -1, dims=1)  # targets[t] = ids[t+1]; the wrapped last column is never selected
    pos = pos.to(device)
    index = pos.reshape(-1).nonzero().squeeze(1)
    rms: dict[int, torch.Tensor] = {}

    def residual_rms(stream, layer, t):
        # the scale lm_head(h) sees: what makes a raw layer policy near one-hot (projection_health)
        rms[layer] = t.reshape(-1, t.shape[-1]).index_select(0, index).float().pow(2).mean(-1).sqrt()

    L = parts(model).num_layers
    with tap(model, [("resid_post", k) for k in range(L)], residual_rms):
        st = stream_stats(model, ids.to(device), mask.to(device), streams=streams_for(convention),
                          positions=pos, targets=targets.to(device), projection=projector.projection,
                          chunk_size=chunk_size, projector=projector)
    cols: dict[str, np.ndarray] = {entropy_col("resid_pre", 0): st.stats[("resid_pre", 0)].entropy.numpy()}
    for s in CONVENTION_STREAMS[convention]:
        for k in range(L):
            cols[entropy_col(s, k)] = st.stats[(s, k)].entropy.numpy()
    for k in range(L):
        ts = st.stats[("resid_post", k)]
        cols[f"logp.resid_post.{k}"] = ts.logprob.numpy()
        cols[f"top1.resid_post.{k}"] = ts.top1_id.numpy().astype(np.int32)
    for k in range(L):
        cols[f"rms.resid_post.{k}"] = rms[k].cpu().numpy()
    cols["H.final"] = st.final.entropy.numpy()
    cols["logp.final"] = st.final.logprob.numpy()
    cols["top1.final"] = st.final.top1_id.numpy().astype(np.int32)
    P = np.array([len(tr.prompt_ids) for tr in batch])
    R = np.array([len(tr.response_ids) for tr in batch])
    if int(R.sum()) != st.num_positions:
        raise RuntimeError(f"position bookkeeping mismatch: {int(R.sum())} expected, {st.num_positions} measured")
    # response_index of every row: its offset from the start of its sample's run of rows
    response_index = np.arange(int(R.sum())) - np.repeat(np.cumsum(R) - R, R)
    return {
        "sample": np.repeat(np.array([tr.index for tr in batch], dtype=np.int32), R),
        "position": (np.repeat(P - 1, R) + response_index).astype(np.int32),
        "response_index": response_index.astype(np.int32),
        "token_id": np.array([t for tr in batch for t in tr.response_ids], dtype=np.int32),
        **cols,
    }


# ---------------------------------------------------------------------------------------------------------------
# staging (resumable) and outputs


class _Staging:
    """One block of token columns per measured batch: Parquet shards under ``out_dir/.bupo_analyze_partial``
    (or in memory when out_dir is None)."""

    def __init__(self, out_dir: Path | None, fingerprint: str | None, resume: bool):
        self.dir = None if out_dir is None else out_dir / STAGING_DIR
        self.mem: list[dict[str, np.ndarray]] = []
        if self.dir is None:
            return
        if fingerprint is None:
            raise ValueError("staging on disk needs the run's fingerprint")
        meta = self.dir / "fingerprint.txt"
        if self.dir.exists() and (not resume or not meta.is_file() or meta.read_text() != fingerprint):
            shutil.rmtree(self.dir)  # settings changed (or resume off): stale shards must not be mixed in
        self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            atomic_write_text(meta, fingerprint)

    def done(self) -> set[int]:
        if self.dir is None:
            return {int(i) for b in self.mem for i in np.unique(b["sample"])}
        out = set()
        for f in self.dir.glob("shard_*.json"):
            out.update(json.loads(f.read_text())["samples"])
        return out

    def put(self, block: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            self.mem.append(block)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        idx = [int(i) for i in np.unique(block["sample"])]
        name = f"shard_{idx[0]:07d}"
        with atomic_path(self.dir / f"{name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pydict(block), tmp)
        # the index file is written after the data: a shard counts as done only once both exist
        atomic_write_text(self.dir / f"{name}.json", json.dumps({"samples": idx}))

    def get(self, generated_key: str) -> Any:
        if self.dir is None:
            return None
        f = self.dir / generated_key
        return json.loads(f.read_text()) if f.is_file() else None

    def put_json(self, key: str, value: Any) -> None:
        if self.dir is not None:
            atomic_write_text(self.dir / key, json.dumps(value))

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """Every staged block's columns, in sample order (batches cover increasing, disjoint sample ranges)."""
        if self.dir is None:
            yield from sorted(self.mem, key=lambda b: int(b["sample"][0]))
            return
        import pyarrow.parquet as pq

        for f in sorted(self.dir.glob("shard_*.json")):
            t = pq.read_table(f.with_suffix(".parquet"))
            yield {c: t.column(c).to_numpy() for c in t.column_names}

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _per_sample(block: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Split a block into its samples: contiguous slices (each sample's rows are adjacent, in sample order)."""
    s = block["sample"]
    if np.any(s[1:] < s[:-1]):
        raise RuntimeError("staged token rows are not in sample order")
    _, starts = np.unique(s, return_index=True)
    for a, b in zip(starts, [*starts[1:], len(s)], strict=True):
        yield {c: v[a:b] for c, v in block.items()}


def _stored(block: Mapping[str, np.ndarray], token_dtype: str) -> dict[str, np.ndarray]:
    """Columns as stored in tokens.parquet: entropies and log-probs in ``token_dtype``, ids as they are."""
    return {c: (v.astype(token_dtype, copy=False) if c.startswith(("H.", "logp.")) else v) for c, v in block.items()}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".bupo_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output directory {str(out_dir)!r} is not writable: {exc.strerror or exc}") from None
    if (out_dir / SUMMARY_FILE).exists() and not overwrite:
        raise ValueError(f"{str(out_dir)!r} already holds a finished analysis ({SUMMARY_FILE}); pass overwrite=True "
                         "(--overwrite) or choose another --out")


@contextlib.contextmanager
def _parquet_rows(path: Path | None) -> Iterator[Callable[[Mapping[str, np.ndarray]], None]]:
    """Yields ``write(columns)``, which appends one row group to ``path``; the file appears atomically when the
    block exits cleanly. Without a path ``write`` does nothing (an in-memory analysis)."""
    if path is None:
        yield lambda cols: None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    with atomic_path(path) as tmp:

        def write(cols: Mapping[str, np.ndarray]) -> None:
            nonlocal writer
            table = pa.Table.from_pydict(dict(cols))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)

        try:
            yield write
        finally:
            if writer is not None:
                writer.close()  # before atomic_path moves (or removes) the file


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import bupo

    return {"bupo_version": bupo.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


def _fingerprint(meta: Mapping) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def _weights_checksum(model) -> float:
    # cheap identity of the weights for resuming: a strided sample of every parameter (not a full hash)
    total = 0.0
    for t in model.parameters():
        flat = t.detach().reshape(-1)
        total += float(flat[:: max(1, flat.numel() // 64)].double().sum())
    return round(total, 6)


# ---------------------------------------------------------------------------------------------------------------
# the settings


@dataclass
class AnalysisConfig:
    """Every setting of one analysis (the model and its inputs are arguments of :func:`run_analysis`).

    Field order and ``metadata["help"]`` follow TRL's config dataclasses, so the settings read (and can be
    turned into command-line flags) the same way. Conventions: 0-based layers ``k`` (paper layer ``k + 1``),
    entropies in nats, projection ``raw`` (paper) | ``final_norm`` (logit lens).
    """

    max_samples: int | None = field(default=None, metadata={"help": "analyse at most N rows / traces (None: all)"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens generated per response (data rows only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generation (paper: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the generation"})
    seed: int = field(default=0, metadata={"help": "generation seed (row i is seeded by its index)"})
    projection: str = field(default="raw", metadata={
        "help": "raw = lm_head(h) (the paper) or final_norm = lm_head(final_norm(h)) (logit lens)"})
    delta: str = field(default="bupo", metadata={"help": "ΔH convention: bupo (the paper) or residual"})
    template: str = field(default="auto", metadata={
        "help": "prompt template for message prompts: auto (as bupo train and bupo eval pick it, "
        "bupo.data.templates.resolve_template), qwen3_no_thinking, chat, octothinker"})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype when the model is a path: auto (the checkpoint's own), float32, bfloat16, float16; "
        "entropies are computed in fp32 either way"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i] when the model is a path"})
    chunk_size: int | None = field(default=None, metadata={
        "help": "rows per logits chunk (extra memory ~ chunk x vocab x 4 bytes); None: 1024 on CPU, up to 8192 on CUDA"})
    epilogue: str = field(default="auto", metadata={
        "help": "entropy epilogue: eager, compiled, triton (CUDA) or auto; same numbers to ~1e-5 nats"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per analysis forward"})
    gen_batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    backend: str = field(default="hf", metadata={"help": "generation engine: hf, vllm or auto (bupo.engines)"})
    token_dtype: str = field(default="float16", metadata={
        "help": "storage dtype of per-token entropies / log-probs in tokens.parquet (summaries are fp32)"})
    boundary_tol: float = field(default=DEFAULT_BOUNDARY_TOL, metadata={
        "help": "boundary rule tolerance, relative to the largest mean FFN ΔH (docs/analysis.md)"})
    heatmap_sample: int | None = field(default=None, metadata={
        "help": "sample index of the layer x token heatmap and the logit-lens table (None: the first analysed)"})
    lens_top: int = field(default=5, metadata={"help": "top tokens per layer and projection in the lens table"})
    figures: bool = field(default=True, metadata={"help": "write figures and report.html (needs an out_dir)"})
    keep_tokens: bool | None = field(default=None, metadata={
        "help": "hold the per-token table in the result (None: only when there is no out_dir)"})
    resume: bool = field(default=True, metadata={"help": "resume from staged shards of an unfinished run"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished analysis in out_dir"})
    progress: bool = field(default=False, metadata={"help": "progress bars"})

    def validate(self, *, out_dir: Path | None) -> None:
        """Raise ValueError (one line saying what is accepted) for any bad setting."""
        from bupo.generation import validate_sampling
        from bupo.internal.adapters import check_projection
        from bupo.internal.stats import EPILOGUES

        check_projection(self.projection)
        check_convention(self.delta)
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {self.epilogue!r}; accepted: {', '.join(EPILOGUES)}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"unknown token_dtype {self.token_dtype!r}; accepted: {', '.join(TOKEN_DTYPES)}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"max_samples must be a positive int, got {self.max_samples!r}")
        for name, v in (("chunk_size", 1 if self.chunk_size is None else self.chunk_size),
                        ("batch_tokens", self.batch_tokens), ("lens_top", self.lens_top)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        validate_sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                          top_k=None)
        if self.figures and out_dir is None:
            raise ValueError("figures need an out_dir (or pass figures=False)")
        hs = self.heatmap_sample
        if hs is not None and (not isinstance(hs, int) or isinstance(hs, bool)):
            raise ValueError(f"heatmap_sample must be a sample index (int) or None, got {hs!r}")


# ---------------------------------------------------------------------------------------------------------------
# the stages: inputs -> traces -> measure -> aggregate -> write


@dataclass
class _Inputs:
    rows: list | None  # data rows to generate for, or
    trace_rows: list | None  # precomputed prompt/response pairs
    data_desc: str | None
    traces_desc: str | None


def _read_inputs(data: Any, traces: Any, max_samples: int | None) -> _Inputs:
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
        return _Inputs(None, trace_rows[:max_samples], None, desc)
    if isinstance(data, str | os.PathLike):
        from bupo.data.datasets import load_rows

        rows, desc = load_rows(data), str(data)
    else:
        rows = list(data)
        desc = f"<{len(rows)} rows given in Python>"
    if not rows:
        raise ValueError(f"no data rows in {desc}")
    return _Inputs(rows[:max_samples], None, desc, None)


def _metadata(model, model_path: str | None, inputs: _Inputs, cfg: AnalysisConfig) -> dict[str, Any]:
    from bupo.internal.adapters import parts

    p = parts(model)
    return {
        "model": model_path or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "projection": cfg.projection,
        "delta_convention": cfg.delta,
        "template": cfg.template,
        "data": inputs.data_desc,
        "traces": inputs.traces_desc,
        "generation": None if inputs.rows is None else {
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "seed": cfg.seed, "n": 1, "generator": "bupo.engines.generate", "backend": cfg.backend},
        "max_samples": cfg.max_samples,
        "position_convention": POSITION_CONVENTION,
        "layer_indexing": "lists: element i = paper layer i+1 = 0-based layer k=i; boundary_layer is 1-based",
        "units": "nats",
        "num_layers": p.num_layers,
        "vocab_size": int(p.lm_head.weight.shape[0]),
        "tied_embeddings": bool(p.tied),
        "softcap": p.softcap,
        "final_norm_weight": _norm_weight_stats(p.final_norm),
    }


def _norm_weight_stats(norm) -> dict[str, float] | None:
    """Scale of the final norm's gain: the factor raw logits miss (raw = lm_head(h), lens = lm_head(g * h / rms(h)))."""
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    if type(norm).__name__.startswith("Gemma"):  # Gemma RMSNorm multiplies by (1 + weight)
        w = 1.0 + w
    return {"rms": float(w.pow(2).mean().sqrt()), "mean": float(w.mean()), "max_abs": float(w.abs().max())}


def collect_traces(model, tokenizer, inputs: _Inputs, cfg: AnalysisConfig, staging: _Staging,
                   context: int | None) -> tuple[list[Trace], list[dict]]:
    """Stage 1: the token ids of every input (generated once and staged, or tokenised) and their trace records."""
    if inputs.rows is not None:
        gen = staging.get("generated.json")
        if gen is None:
            gen = generate_traces(model, tokenizer, inputs.rows, template=cfg.template,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed, batch_size=cfg.gen_batch_size, progress=cfg.progress,
                                  context=context, backend=cfg.backend)
            staging.put_json("generated.json", gen)
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


def measure(model, tokenizer, todo: Sequence[Trace], cfg: AnalysisConfig, staging: _Staging) -> dict[str, Any] | None:
    """Stage 2: one hooked forward per batch of the traces not staged yet; each batch's token columns are staged.

    Returns how the logits were made (``gemm``, ``epilogue``, ``chunk_size``) plus ``seconds``, or None when
    every trace was already staged by a previous (resumed) run.
    """
    import torch
    from tqdm.auto import tqdm

    from bupo.generation import eval_mode
    from bupo.internal.stats import Projector

    done = staging.done()
    pending = [tr for tr in todo if tr.index not in done]
    if not pending:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    projector = Projector(model, cfg.projection, epilogue=cfg.epilogue)  # one fp32 cast shared by every stream
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc="analyze", unit="sample",
               disable=not cfg.progress)
    with eval_mode(model), torch.inference_mode():
        for batch in _batches(pending, cfg.batch_tokens):
            staging.put(measure_batch(model, batch, convention=cfg.delta, projector=projector,
                                      chunk_size=cfg.chunk_size, pad_id=pad_id))
            bar.update(len(batch))
    bar.close()
    return {"gemm": projector.gemm, "epilogue": projector.epilogue,
            "chunk_size": cfg.chunk_size or projector.default_chunk, "seconds": time.perf_counter() - t0}


@dataclass
class _Aggregate:
    stats: dict[str, Any]
    num_samples: int
    num_tokens: int
    heat: np.ndarray | None
    frames: list[dict[str, np.ndarray]]


def aggregate(staging: _Staging, num_layers: int, cfg: AnalysisConfig, heatmap_index: int,
              tokens_path: Path | None, keep: bool) -> _Aggregate:
    """Stage 3: one pass over the staged blocks: per-layer statistics, the heatmap row, tokens.parquet (one row
    group per batch: memory per batch, not per run) and/or the in-memory table."""
    agg = Aggregator(num_layers, cfg.delta)
    heat = None
    frames = []
    with _parquet_rows(tokens_path) as write_tokens:
        for block in staging.blocks():
            for s in _per_sample(block):
                agg.add_sample(s)
                if int(s["sample"][0]) == heatmap_index:
                    heat = _layer_matrix(s, num_layers)
            stored = _stored(block, cfg.token_dtype)
            write_tokens(stored)
            if keep:
                frames.append(stored)
    return _Aggregate(agg.result(), agg.num_samples, agg.num_tokens, heat, frames)


def build_summary(meta: Mapping[str, Any], agg: _Aggregate, *, num_inputs: int, skip_reason: Mapping[int, str],
                  cfg: AnalysisConfig, engine: Mapping[str, Any] | None, heatmap_index: int,
                  lens: Mapping[str, Any] | None) -> dict[str, Any]:
    """Stage 3 (cont.): summary.json's content: metadata, per-layer statistics, projection health, boundary."""
    skipped = Counter(skip_reason.values())
    stats = agg.stats
    health = projection_health(stats, projection=cfg.projection, final_norm_weight=meta.get("final_norm_weight"))
    bd = boundary_details(stats["ffn_entropy_change"], tol=cfg.boundary_tol)
    return {
        **meta,
        "num_samples": agg.num_samples,
        "num_tokens": agg.num_tokens,
        "num_inputs": num_inputs,
        "skipped": {r: int(skipped.get(r, 0)) for r in SKIP_REASONS},
        **stats,
        "projection_health": health,
        **boundary_record(bd, health, delta=cfg.delta, projection=cfg.projection,
                           ffn_delta_means=stats["ffn_entropy_change"]),
        "heatmap_sample": heatmap_index,
        "lens": lens,
        "chunk_size": engine["chunk_size"] if engine else cfg.chunk_size,
        # how the logits were made and reduced in this call (None: every sample came from a resumed run)
        "gemm": engine["gemm"] if engine else None,
        "epilogue": engine["epilogue"] if engine else None,
        "token_dtype": cfg.token_dtype,
        "measure_seconds": round(engine["seconds"], 3) if engine else 0.0,
        **_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_outputs(result: AnalysisResult, *, all_traces: Sequence[Trace], trace_records: Sequence[Mapping],
                  skip_reason: Mapping[int, str], heat: np.ndarray | None, figures: bool) -> None:
    """Stage 4: traces.jsonl, figures, report.html and, last, summary.json (its presence marks a finished run)."""
    out = result.out_dir
    summary = result.summary
    atomic_write_text(out / TRACES_FILE, "".join(
        json.dumps({"index": i, **rec, "prompt_tokens": len(all_traces[i].prompt_ids),
                    "response_tokens": len(all_traces[i].response_ids), "skipped": skip_reason.get(i)},
                   ensure_ascii=False, default=str) + "\n"
        for i, rec in enumerate(trace_records)))
    if figures:
        from bupo.analysis.figures import make_figures
        from bupo.analysis.report import write_report

        result.figures = make_figures(summary, out, heatmap=heat, heatmap_sample=summary["heatmap_sample"])
        write_report(summary, result.figures, out / REPORT_FILE)
    atomic_write_json(out / SUMMARY_FILE, summary, indent=1, ensure_ascii=False, allow_nan=False)


def _trace_lens(model, tokenizer, trace: Trace, top: int) -> dict[str, Any] | None:
    """The logit-lens table (raw and final_norm side by side) at a few response positions of one trace."""
    from bupo.analysis.lens import lens_table

    R = len(trace.response_ids)
    # the position predicting the first response token, one a quarter of the way in, and the last one
    offsets = sorted({0, R // 4, R - 1})
    P = len(trace.prompt_ids)
    ids = trace.prompt_ids + trace.response_ids
    return lens_table(model, tokenizer, ids, positions=[P - 1 + o for o in offsets], top=top, sample=trace.index)


# ---------------------------------------------------------------------------------------------------------------
# the API


def run_analysis(
    model: Any,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | Sequence[Mapping] | None = None,
    traces: str | os.PathLike | Sequence[Mapping] | None = None,
    out_dir: str | os.PathLike | None = None,
    config: AnalysisConfig | None = None,
) -> AnalysisResult:
    """:func:`analyze` with its settings in one :class:`AnalysisConfig` (the stages, in order)."""
    from bupo.internal.adapters import parts

    cfg = config or AnalysisConfig()
    out = None if out_dir is None else Path(out_dir)
    cfg.validate(out_dir=out)
    if out is not None:
        _check_out_dir(out, cfg.overwrite)
    model_path = None
    if isinstance(model, str | os.PathLike):
        model_path = str(model)
        model, tokenizer = load_model(model, dtype=cfg.dtype, device=cfg.device)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (analyze(model, tokenizer, ...))")
    from bupo.data.templates import resolve_template

    # auto -> the template bupo train / bupo eval use for this tokenizer; the summary records the resolved one
    from bupo.engines import resolve_backend

    cfg = dataclasses.replace(cfg, template=resolve_template(tokenizer, cfg.template), backend=resolve_backend(cfg.backend))
    p = parts(model)
    L = p.num_layers
    inputs = _read_inputs(data, traces, cfg.max_samples)
    meta = _metadata(model, model_path, inputs, cfg)

    fingerprint = None
    if out is not None:  # only staging on disk can be resumed, so only it needs to recognise its own shards
        fp_meta = {k: meta[k] for k in ("model", "model_type", "dtype", "projection", "delta_convention", "template",
                                        "generation", "max_samples", "num_layers")}
        # the inputs' content (not their path): a resumed run must never mix shards of different traces
        fp_meta["inputs"] = _fingerprint({"rows": inputs.rows, "traces": inputs.trace_rows})
        fp_meta["weights"] = _weights_checksum(model)
        fingerprint = _fingerprint(fp_meta)
    staging = _Staging(out, fingerprint, cfg.resume)
    ctx = getattr(p.text_config, "max_position_embeddings", None)

    all_traces, trace_records = collect_traces(model, tokenizer, inputs, cfg, staging, ctx)
    todo, skip_reason = select_traces(all_traces, ctx, trace_records if inputs.rows is not None else None)
    hs = cfg.heatmap_sample
    if hs is not None and hs not in {tr.index for tr in todo}:
        why = skip_reason.get(hs, f"out of range: inputs are 0..{len(all_traces) - 1}")
        raise ValueError(f"heatmap_sample {hs} is not analysed ({why}); pick an analysed sample")
    hm_index = hs if hs is not None else todo[0].index

    engine = measure(model, tokenizer, todo, cfg, staging)
    lens = None
    if out is not None:  # the report's logit-lens table: one short forward of one trace
        lens = _trace_lens(model, tokenizer, next(tr for tr in todo if tr.index == hm_index), cfg.lens_top)
    keep = bool(cfg.keep_tokens or (cfg.keep_tokens is None and out is None))
    agg = aggregate(staging, L, cfg, hm_index, None if out is None else out / TOKENS_FILE, keep)
    summary = build_summary(meta, agg, num_inputs=len(all_traces), skip_reason=skip_reason, cfg=cfg, engine=engine,
                            heatmap_index=hm_index, lens=lens)
    result = AnalysisResult(summary=summary, out_dir=out)
    if keep:
        import pandas as pd

        result._tokens = pd.concat([pd.DataFrame(f) for f in agg.frames], ignore_index=True)
    if out is None:
        return result
    write_outputs(result, all_traces=all_traces, trace_records=trace_records, skip_reason=skip_reason,
                  heat=agg.heat, figures=cfg.figures)
    staging.cleanup()
    return result


def analyze(
    model: Any,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | Sequence[Mapping] | None = None,
    traces: str | os.PathLike | Sequence[Mapping] | None = None,
    out_dir: str | os.PathLike | None = None,
    config: AnalysisConfig | None = None,
    **settings: Any,
) -> AnalysisResult:
    """Analyse the internal-policy entropy of ``model`` over response tokens (see the module docstring).

    Args:
        model: a local checkpoint folder, or a loaded HF causal LM (then ``tokenizer`` is required).
        data: rows (paper parquet / JSONL path, or a list of row dicts with a ``prompt`` message list); one
            response per row is generated (seeded, ``template`` applied). Mutually exclusive with ``traces``.
        traces: precomputed ``{"prompt": str | messages, "response": str}`` (JSONL path or list). String prompts
            are taken verbatim; message lists get ``template``.
        out_dir: where to write summary.json, tokens.parquet, traces.jsonl, figures and report.html; None keeps
            everything in memory (no files).
        config: an :class:`AnalysisConfig`; or its fields as keyword arguments (``projection="final_norm"``,
            ``max_new_tokens=256``, ...), which override the config's. See :class:`AnalysisConfig` for each one.

    The model runs in eval mode; a loaded model's training flags are restored when analyze returns or raises.

    Returns an :class:`AnalysisResult`. Raises ValueError for bad input; samples that cannot be analysed
    (empty prompt or response, longer than the context) are skipped and counted in ``summary["skipped"]``.
    """
    names = {f.name for f in dataclasses.fields(AnalysisConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"analyze() got unexpected keyword arguments {unknown}; settings: {', '.join(sorted(names))}")
    cfg = dataclasses.replace(config or AnalysisConfig(), **settings)
    return run_analysis(model, tokenizer, data=data, traces=traces, out_dir=out_dir, config=cfg)


def load_summary(path: str | os.PathLike) -> dict:
    """Read ``summary.json`` (``path`` may be the file or the analysis directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    if not p.is_file():
        raise ValueError(f"no analysis summary at {str(p)!r} (run `bupo analyze --out DIR` first)")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(summary, dict) or "num_layers" not in summary:
        raise ValueError(f"{str(p)!r} is not a bupo analyze summary (no 'num_layers')")
    return summary


def suggested_layer(path: str | os.PathLike, *, projection: str | None = None) -> int:
    """The 0-based internal layer ``k`` suggested by an analysis (``summary.json`` or its directory).

    This is ``boundary_layer - 1`` (paper layer -> code index). Raises ValueError, with the analysis' reason and
    the options, when it has no usable boundary layer, or when ``projection`` is given and the analysis was made
    with another one (its boundary describes another policy).
    """
    s = load_summary(path)
    made_with = s.get("projection")
    if projection is not None and made_with is not None and made_with != projection:
        raise ValueError(f"the analysis at {str(path)!r} was made with projection {made_with!r}, but the internal "
                         f"policy uses {projection!r}: its boundary is another policy's. Analyse with "
                         f"`bupo analyze --projection {projection}` (pass it with --analysis), or give --internal-layer K")
    k = s.get("suggested_internal_layer")
    if k is None:
        bd = s.get("boundary") or {}
        note = bd.get("reason") or bd.get("note", "no boundary layer")
        opts = bd.get("options")
        raise ValueError(f"the analysis at {str(path)!r} suggests no internal layer: {note}"
                         + (f". Options: {'; '.join(opts)}" if opts else ""))
    if not isinstance(k, int) or not 0 <= k < int(s["num_layers"]):
        raise ValueError(f"suggested_internal_layer {k!r} in {str(path)!r} is not a layer of a {s['num_layers']}-layer model")
    return k
