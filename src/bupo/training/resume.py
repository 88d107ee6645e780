"""``bupo train --resume``: which checkpoint, whether the run still matches it, and a run that had already finished.

Checkpoints are written and marked complete by the trainer (:mod:`bupo.training.checkpointing`); here they are chosen
and compared against the run being started.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``"latest"`` = the newest *complete* checkpoint-* in ``output_dir`` (torn ones,
    from a kill during a save, are skipped and named in one line); an explicit folder must be complete."""
    if resume is None:
        return None
    from bupo.training.checkpointing import checkpoint_problem

    if resume == "latest":
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = Path(output_dir)
        found = []
        if out.is_dir():
            for d in out.iterdir():
                tail = d.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
                if d.is_dir() and d.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and tail.isdigit():
                    found.append((int(tail), d))
        skipped = []
        for _, d in sorted(found, reverse=True):
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
