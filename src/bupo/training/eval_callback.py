"""Evaluation during training: the held-out sets (the same names, rows and seed as ``bupo eval``) and the
TrainerCallback that scores Avg@K / Pass@K on them every ``eval_every`` rollout steps and at the end."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bupo.training.arguments import BuPOScriptArguments
from bupo.training.gather import full_params


def eval_sets(specs: list[str] | None, train_spec: str | None, rows_limit: int | None) -> dict[str, list[dict]]:
    """The in-training eval sets: :func:`bupo.data.datasets.load_benchmarks` (the same names, rows and seed as
    ``bupo eval``); default the bundled test split when training on the bundled task; ``["none"]`` disables."""
    from bupo.data.datasets import BUNDLED, load_benchmarks

    if specs is None:
        specs = [BUNDLED] if (train_spec in (None, BUNDLED)) else []
    elif isinstance(specs, str):  # one path, not its letters
        specs = [specs]
    if not specs or [s.lower() for s in specs] == ["none"]:
        return {}
    return load_benchmarks(specs, rows_limit)


def check_eval_context(sets: dict[str, list[dict]], tokenizer: Any, template: str, script: BuPOScriptArguments,
                       train_args: Any, context: int | None) -> None:
    """In-training evaluation must not fail half-way through a run: its prompts are checked against the model's
    context now (:mod:`bupo.generation` would reject them at the first evaluation)."""
    if not sets or context is None:
        return
    from bupo.generation import check_context

    max_new = script.eval_max_new_tokens or train_args.max_completion_length
    for name, rows in sets.items():
        check_context(prompt_lengths(rows, tokenizer, template), max_new, context,
                      what=f"eval prompts of {name} (eval_max_new_tokens)")


def prompt_lengths(rows: list[dict], tokenizer: Any, template: str) -> list[int]:
    """Token counts of the rows' prompts as evaluation renders and encodes them."""
    from bupo.data.templates import render_prompt
    from bupo.generation import encode_prompt

    return [len(encode_prompt(tokenizer, render_prompt(tokenizer, r["prompt"], template))) for r in rows]


class ProgressLines:
    """An evaluation backend that reports on another: ``what: 40/100 problems (160/400 samples)`` as batches
    finish, at most one line per ``every`` seconds (plus the first and the last), so a long evaluation - before
    training it runs under a bar still at rollout 0 - does not sit silent. Generation is ``inner``'s, unchanged."""

    def __init__(self, inner: Any, what: str, report: Callable[[str], None], every: float = 10.0) -> None:
        self.inner, self.what, self.report, self.every = inner, what, report, every
        self.name = inner.name  # the same generation settings (and resume keys) as the backend itself

    def generate(self, requests: Sequence[tuple[str, int]], settings: Any, on_batch: Any = None) -> list:
        left = Counter(prompt for prompt, _ in requests)  # samples still to come, per problem
        problems, samples, done = len(left), len(requests), 0
        t0 = last = time.monotonic()
        self.report(f"{self.what}: 0/{problems} problems (0/{samples} samples)")

        def counted(indices: list[int], completions: list) -> None:
            nonlocal done, last
            for i in indices:
                left[requests[i][0]] -= 1
            done += len(indices)
            now = time.monotonic()
            if done == samples or now - last >= self.every:
                finished = sum(1 for v in left.values() if v == 0)
                took = f" in {now - t0:.0f} s" if done == samples else ""
                self.report(f"{self.what}: {finished}/{problems} problems ({done}/{samples} samples){took}")
                last = now
            if on_batch is not None:
                on_batch(indices, completions)

        return self.inner.generate(requests, settings, counted)


def _report_line(line: str) -> None:
    """One line on stderr, clear of the training console's bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def engine_backend(trainer: Any, sets: dict[str, list[dict]], template: str, script: BuPOScriptArguments,
                   lengths: list[int] | None = None) -> Any:
    """The training run's own colocated vLLM engine as the evaluation backend, its weights synced to the trained
    model first; None (evaluate with transformers) unless the run generates with ``use_vllm`` in colocate mode without
    sleep mode and the eval prompts fit the engine's context.

    Same per-sample seeds and scoring as the HF backend; the texts differ (another engine's kernels and random
    streams), so an evaluation's samples are keyed by the backend's name. With several processes the requests are
    shared out between the engines (:class:`RankShares`): one per process, or one per tensor-parallel group of
    ``vllm_tensor_parallel_size`` consecutive ranks (TRL's groups), whose ranks all call it with the group's share.
    Every rank must call this (the weight sync is collective under ZeRO-3 and FSDP2), outside :func:`full_params`
    (the sync gathers the weights itself; inside, FSDP2's root is unsharded and TRL's sync would fail).
    ``lengths``: the eval prompts' token counts when already known (:func:`prompt_lengths`)."""
    args = trainer.args
    gen = getattr(trainer, "vllm_generation", None)
    if not (getattr(args, "use_vllm", False) and args.vllm_mode == "colocate" and gen is not None
            and not args.vllm_enable_sleep_mode):
        return None
    from bupo.evaluation.backends import VLLMBackend
    from bupo.generation import check_context

    tok, config = trainer.processing_class, gen.llm.llm_engine.model_config
    max_new = script.eval_max_new_tokens or args.max_completion_length
    if lengths is None:
        lengths = [n for rows in sets.values() for n in prompt_lengths(rows, tok, template)]
    try:
        check_context(lengths, max_new, getattr(config, "max_model_len", None))
    except ValueError:
        return None  # the engine was sized for the rollouts; transformers takes the longer eval requests
    if trainer.state.global_step != trainer._last_loaded_step:  # TRL's own "synced at this step" marker
        gen.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step
    engine = VLLMBackend(gen.llm, tokenizer=tok, batch_size=max(script.eval_batch_size, 256))
    return shared(trainer, engine, group=args.vllm_tensor_parallel_size)


def shared(trainer: Any, backend: Any, lockstep: bool = False, group: int = 1) -> Any:
    """``backend`` with the requests shared out between the trainer's processes (:class:`RankShares`), or as it is
    in one process. ``lockstep``: every rank generates in every block (FSDP2, whose forwards are collectives);
    ``group``: that many consecutive ranks drive one engine (vLLM tensor parallelism) and take one share."""
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return backend
    from accelerate.utils import gather_object

    if group < 1 or acc.num_processes % group:
        raise ValueError(f"{group} ranks per engine do not divide {acc.num_processes} processes")
    return RankShares(backend, acc.process_index // group, acc.num_processes // group, gather_object,
                      lockstep=lockstep)


class RankShares:
    """An evaluation backend for several processes and ``world`` engines: the ranks of engine ``rank`` (one, or a
    tensor-parallel group calling it together) generate requests rank, rank + world, ... of each block with ``inner``
    and every process gets all of the block's completions (``gather``: ``accelerate.utils.gather_object`` over every
    process, a collective; a group's completions come back once per member), in request order, so scoring and the
    sample log are those of one engine. The samples are the same: each request carries its own seed. Blocks of
    ``inner.batch_size`` requests per engine keep ``on_batch`` (the sample log, the progress lines) reporting as they
    finish.

    ``lockstep``: ``inner`` runs collectives (an FSDP2 model's forwards, stepped together by
    ``HFBackend(synced=True)``), so every rank calls it once in every block: a rank whose share of the last block is
    empty generates the block's first request again and drops it."""

    def __init__(self, inner: Any, rank: int, world: int, gather: Callable[[list], list],
                 lockstep: bool = False) -> None:
        self.inner, self.rank, self.world, self.gather, self.lockstep = inner, rank, world, gather, lockstep
        self.name = inner.name  # the samples are keyed by the engine's name, as with one process

    def generate(self, requests: Sequence[tuple[str, int]], settings: Any, on_batch: Any = None) -> list:
        out: list = []
        block = max(1, int(getattr(self.inner, "batch_size", 1))) * self.world
        for start in range(0, len(requests), block):
            indices = range(start, min(start + block, len(requests)))
            mine = list(indices)[self.rank :: self.world]
            if mine:
                done = self.inner.generate([requests[i] for i in mine], settings)
            elif self.lockstep:  # the others' forwards wait for this rank's
                self.inner.generate([requests[indices[0]]], settings)
                done = []
            else:
                done = []
            got = dict(self.gather(list(zip(mine, done, strict=True))))
            if sorted(got) != list(indices):
                raise RuntimeError(f"evaluation on {self.world} engines: completions for {len(got)} of the "
                                   f"{len(indices)} requests came back (a rank generated a different share)")
            completions = [got[i] for i in indices]
            out.extend(completions)
            if on_batch is not None:
                on_batch(list(indices), completions)
        return out


@contextlib.contextmanager
def shared_samples(accelerator: Any, step_dir: Path, model_id: str | None) -> Iterator[tuple[Path | None, str]]:
    """Where each process's :func:`bupo.evaluation.evaluate` keeps its sample log, and the model id keying it, so
    that every process resumes the same samples and asks for the same missing requests (:class:`RankShares` shares
    out one list, and FSDP2's ranks must step together).

    One process: ``step_dir`` and ``model_id``. Several: main keeps ``step_dir`` (what a run stopped during this
    evaluation wrote there is reused, as with one process) and sends its samples log and ``model_id`` (its weights'
    fingerprint) to the others. Where main has samples, each other rank resumes from a private copy in a temporary
    folder, removed after; where it has none, they write nothing (None), as before any resume."""
    if accelerator.num_processes == 1:
        yield step_dir, str(model_id)
        return
    from accelerate.utils import broadcast_object_list

    from bupo.evaluation.samples import SAMPLES_FILE

    payload: list[Any] = [None]
    if accelerator.is_main_process:
        log = step_dir / SAMPLES_FILE
        payload = [(model_id, log.read_bytes() if log.is_file() else b"")]
    broadcast_object_list(payload, from_process=0)
    model_id, stored = payload[0]
    if accelerator.is_main_process or not stored:
        yield (step_dir if accelerator.is_main_process else None), model_id
        return
    with tempfile.TemporaryDirectory(prefix="bupo-eval-rank-") as tmp:
        (Path(tmp) / SAMPLES_FILE).write_bytes(stored)
        yield Path(tmp), model_id


def earlier_evals(history: list[dict], steps_per_rollout: int, out_dir: Path, upto: int) -> list[dict]:
    """The evaluation records, up to optimizer step ``upto``, of the run a resume continues: those its last
    ``bupo_run.json`` lists (the one at the end of training happens after the last checkpoint) and those of the
    checkpoint's log history (a run stopped before it wrote ``bupo_run.json``); ``generation`` None where unknown."""
    import json

    found: dict[int, dict] = {}
    try:
        previous = json.loads((out_dir / "bupo_run.json").read_text(encoding="utf-8")).get("evals") or []
        found = {int(e["step"]): e for e in previous if int(e["step"]) <= upto}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    for h in history:
        step = int(h.get("step", -1))
        if "eval/avg" in h and 0 <= step <= upto and step not in found:
            found[step] = {"step": step, "rollout_step": step // steps_per_rollout,
                           **{k: v for k, v in h.items() if k.startswith("eval/")}, "generation": None}
    return [found[s] for s in sorted(found)]


def make_eval_callback(trainer: Any, sets: dict[str, list[dict]], script: BuPOScriptArguments, template: str,
                       out_dir: Path, records: list[dict]) -> Any:
    """A TrainerCallback running :func:`bupo.evaluation.evaluate` every ``eval_every`` rollout steps and at the end."""
    from transformers import Trainer, TrainerCallback

    args = trainer.args
    every = script.eval_every * args.optimizer_steps_per_rollout
    lengths: list[int] = []  # the eval prompts' token counts, for the engine's context check: once per run

    def engine_or_none() -> Any:
        if getattr(args, "use_vllm", False) and not lengths:
            lengths.extend(n for rows in sets.values() for n in prompt_lengths(rows, trainer.processing_class, template))
        return engine_backend(trainer, sets, template, script, lengths or None)

    def run_eval(step: int) -> None:
        from bupo.evaluation import evaluate
        from bupo.evaluation.backends import HFBackend
        from bupo.provenance import model_fingerprint
        from bupo.rewards.api import parse_rewards

        t0 = time.time()
        main = trainer.accelerator.is_main_process
        what = "eval before training" if step == 0 else f"eval at step {step}"
        # every rank takes part: each generates a share of the requests with its engine or its model (FSDP2: the
        # ranks step together, each forward being a collective); main writes.
        # Generation (bupo.generation) runs in eval mode (no_grad on a sharded model, else inference_mode) and
        # restores the training flags.
        step_dir = out_dir / "evals" / f"step-{step:06d}"

        def score(m: Any, inner: Any, model_id: str, eval_dir: Path | None) -> Any:
            backend = ProgressLines(inner, what, _report_line if main else (lambda line: None))
            return evaluate(m, trainer.processing_class, sets, n=script.eval_samples,
                            max_new_tokens=script.eval_max_new_tokens or args.max_completion_length,
                            temperature=args.temperature, top_p=args.top_p, template=template,
                            reward=parse_rewards(script.reward)[0], seed=args.seed,
                            batch_size=script.eval_batch_size, label=f"step {step}", backend=backend,
                            model_id=model_id, out_dir=eval_dir)

        engine = engine_or_none()  # synced before any gather: the engine needs no gathered copy while it generates
        with contextlib.ExitStack() as views:
            with full_params(trainer.model_wrapped, trainer.accelerator) as m:
                # every rank resumes main's samples of this step (a run stopped during it wrote them), keyed by
                # main's fingerprint of the weights, as evaluate() keys samples
                eval_dir, model_id = views.enter_context(
                    shared_samples(trainer.accelerator, step_dir, model_fingerprint(m) if main else None))
                if engine is None:
                    # DDP, and ZeRO-3 inside full_params (all weights gathered, DeepSpeed's hooks lifted): each
                    # rank's forwards are its own; FSDP2's are collectives: the ranks step together (synced, lockstep)
                    fsdp = bool(trainer.is_fsdp_enabled)
                    inner = shared(trainer, HFBackend(m, trainer.processing_class, batch_size=script.eval_batch_size,
                                                      synced=fsdp and trainer.accelerator.num_processes > 1),
                                   lockstep=fsdp)
                    res = score(m, inner, model_id, eval_dir)
            if engine is not None:
                inner, res = engine, score(trainer.model, engine, model_id, eval_dir)
        metrics = res.metrics("eval")
        metrics["eval/seconds"] = time.time() - t0
        records.append({"step": step, "rollout_step": step // args.optimizer_steps_per_rollout, **metrics,
                        "generation": inner.name})  # hf or vllm (the run's colocated engine: engine_backend)
        should_log = trainer.control.should_log  # set for this step's training log, which runs after callbacks
        Trainer.log(trainer, dict(metrics))  # bypass GRPOTrainer.log: it would flush the train metric window
        # Trainer.log's on_log clears should_log: without this the step's training metrics went unlogged and were
        # averaged into the next logged step's (bupo/phase 0.5 where an eval fell on the last internal step)
        trainer.control.should_log = should_log

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            if state.global_step > 0 and not records:  # resumed: bupo_run.json lists the earlier evaluations too
                records.extend(earlier_evals(state.log_history, args.optimizer_steps_per_rollout, out_dir,
                                             state.global_step))
            if script.eval_before_train and state.global_step == 0:
                run_eval(0)

        def on_step_end(self, a, state, control, **kw):
            if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                run_eval(state.global_step)

        def on_train_end(self, a, state, control, **kw):
            if not records or records[-1]["step"] != state.global_step:
                run_eval(state.global_step)

    return EvalCallback()
