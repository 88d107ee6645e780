"""``bupo train --resume``: the output folder's guard, which checkpoint, whether the run still matches it, and a
run that had already finished.

Checkpoints are written and marked complete by the trainer (:mod:`bupo.training.checkpointing`); here they are chosen
and compared against the run being started. :func:`claim_output` holds the output folder (:func:`bupo.io.guard_output`)
and refuses to replace a run's model or checkpoints without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "bupo_run.json"
#: what a training run leaves in its folder (a started or finished one): another run there needs --resume or --overwrite
RUN_MARKERS = (RUN_FILE, "checkpoint-*", "config.json", "adapter_config.json")
#: what --overwrite removes before a new run, so that nothing of the old one mixes in (no user file is named here)
RUN_OUTPUTS = (*RUN_MARKERS, "log_history.json", "evals", "analysis", "README.md", "generation_config.json",
               "*.safetensors", "model.safetensors.index.json", "adapter_model.bin", "pytorch_model*.bin",
               "training_args.bin", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
               "vocab.json", "merges.txt")


@contextlib.contextmanager
def claim_output(out_dir: Path, resume: str | None, overwrite: bool, model_path: str) -> Iterator[str | None]:
    """Hold ``out_dir`` for this run (the main process locks it; a second run there gets a one-line error) and yield
    the checkpoint to resume from (:func:`resolve_resume`). Refused without ``overwrite``: a folder holding a run
    (:data:`RUN_MARKERS`) unless resuming from one of its checkpoints, and a resume from an older checkpoint than
    the folder's newest (the newer ones would be replaced). With ``overwrite`` those are removed first. ``--out``
    may never be the ``--model`` folder (nor hold it when overwriting)."""
    main = int(os.environ.get("RANK", "0")) == 0
    # recover=False: every rank picks the checkpoint here, so none may move one meanwhile; an interrupted checkpoint
    # publish is completed by the trainer's next save (bupo.training.checkpointing), after the resume
    own = resume == "latest" or (resume is not None and Path(resume).resolve().parent == out_dir.resolve())
    from bupo.io import guard_output

    with guard_output(out_dir, command="bupo train", inputs=[model_path], finished=() if own else RUN_MARKERS,
                      overwrite=overwrite, what="a training run", lock=main, recover=False,
                      hint="give --resume to continue it, --overwrite to replace it, or another --out"):
        checkpoint = resolve_resume(resume, str(out_dir))
        newer = _newer_checkpoints(checkpoint, out_dir) if own and checkpoint is not None else []
        if newer and not overwrite:
            raise ValueError(f"--resume {resume}: {out_dir} holds newer checkpoints ({', '.join(newer)}), which "
                             "resuming from it would replace; give --resume alone for the newest, or --overwrite to "
                             "discard the newer ones")
        doomed = [out_dir / n for n in newer] if own else (
            sorted({p for pattern in RUN_OUTPUTS for p in out_dir.glob(pattern)}) if overwrite else [])
        if any(p.resolve() == Path(model_path).resolve() or p.resolve() in Path(model_path).resolve().parents
               for p in doomed):
            raise ValueError(f"--overwrite: --model {model_path} lies in {out_dir}, whose run it would remove; "
                             "copy the model elsewhere or choose another --out")
        if doomed and main:
            print(f"bupo train: --overwrite: removing {', '.join(p.name for p in doomed)} from {out_dir}", flush=True)
            for p in doomed:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        yield checkpoint


def _newer_checkpoints(checkpoint: str, out_dir: Path) -> list[str]:
    """The complete checkpoint-* folders of ``out_dir`` past ``checkpoint``'s step."""
    from bupo.training.checkpointing import checkpoint_problem

    step = _checkpoint_step(checkpoint)
    return [d.name for s, d in _checkpoint_folders(out_dir) if s > step and checkpoint_problem(d) is None]


def _checkpoint_folders(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint-N folder in ``out``, newest first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    if out.is_dir():
        for d in out.iterdir():
            tail = d.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
            if d.is_dir() and d.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and tail.isdigit():
                found.append((int(tail), d))
    return sorted(found, reverse=True)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``"latest"`` = the newest *complete* checkpoint-* in ``output_dir`` (torn ones,
    from a kill during a save, are skipped and named in one line); an explicit folder must be complete."""
    if resume is None:
        return None
    from bupo.training.checkpointing import checkpoint_problem

    if resume == "latest":
        skipped = []
        for _, d in _checkpoint_folders(Path(output_dir)):
            problem = checkpoint_problem(d)
            if problem is None:
                if skipped:
                    print(f"bupo train: --resume: skipped incomplete {'; '.join(skipped)}; resuming from {d.name}",
                          flush=True)
                return str(d)
            skipped.append(f"{d.name} ({problem})")
        if skipped:
            raise ValueError(f"--resume: no complete checkpoint in {output_dir}: {'; '.join(skipped)}")
        raise ValueError(f"--resume: no checkpoint-* folder in {output_dir}")
    if not Path(resume).is_dir():
        raise ValueError(f"--resume: {resume} is not a checkpoint folder")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ValueError(f"--resume: {resume} is an incomplete checkpoint ({problem}); resume from a complete one "
                         "or give --resume alone for the newest complete one")
    return resume


def check_resume_matches(checkpoint: str, current: dict[str, Any], force: bool) -> None:
    """ValueError naming every setting of ``current`` that differs from the checkpoint's run, unless ``force``."""
    from bupo.training.checkpointing import read_checkpoint_marker

    marker = read_checkpoint_marker(checkpoint)
    saved = (marker or {}).get("run")
    if not isinstance(saved, dict):
        logger.warning("--resume: %s records no run settings (saved by an older bupo or plain TRL); not checked",
                       checkpoint)
        return
    diffs = [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and saved[k] != v]
    if not diffs:
        return
    if force:
        print(f"bupo train: warning: --force-resume: resuming {checkpoint} with changed {'; '.join(diffs)}",
              flush=True)
        return
    raise ValueError(f"--resume: the run differs from {checkpoint}'s: {'; '.join(diffs)}; give the same settings, "
                     "or --force-resume to resume anyway")


def data_fingerprint(dataset: Any) -> str:
    """16 hex digits over the training prompts and answers, recorded in every checkpoint (a resume on other data
    is refused)."""
    from bupo.provenance import fingerprint

    return fingerprint(b"".join(prompt.encode("utf-8", "surrogatepass") + b"\0" + gt.encode("utf-8", "surrogatepass")
                                + b"\0" for prompt, gt in zip(dataset["prompt"], dataset["ground_truth"], strict=True)))


def train_or_finish(trainer: Any, resume: str | None) -> Any:
    """``trainer.train(resume_from_checkpoint=resume)``, except when the checkpoint already holds every optimizer
    step (a kill hit the final save): transformers would train past max_steps, so its weights and state are loaded
    and nothing is trained."""
    done = _checkpoint_step(resume) if resume is not None else 0
    if resume is not None and trainer.args.max_steps > 0 and done >= trainer.args.max_steps:
        return _finished_run(trainer, resume, done)
    return trainer.train(resume_from_checkpoint=resume)


def _checkpoint_step(folder: str) -> int:
    import json

    return int(json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def _finished_run(trainer: Any, checkpoint: str, step: int) -> Any:
    """The TrainOutput of a run whose checkpoint already holds every optimizer step: its weights and state, loaded."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    from bupo.training.checkpointing import read_checkpoint_marker

    print(f"bupo train: {checkpoint} is at optimizer step {step} >= max_steps {trainer.args.max_steps}: "
          "nothing left to train; saving its weights", flush=True)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    loss_sum = float((read_checkpoint_marker(checkpoint) or {}).get("train_loss_sum", float("nan")))
    return TrainOutput(step, loss_sum / max(step, 1), {"train_loss": loss_sum / max(step, 1)})
