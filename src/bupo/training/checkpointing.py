"""Checkpoints of :class:`bupo.training.trainer.BuPOTrainer` that a kill cannot tear, and their resume.

Every file (all ranks) is written into a staging folder (:class:`bupo.io.Staging`, the same partial-folder mechanism
as ``bupo analyze`` and evaluation), described by a completion marker written last, made durable (fsync) and only
then renamed into place as ``checkpoint-N``: a kill mid-save leaves no partial ``checkpoint-N``. BuPO's
own state travels with it: every rank's probe batch (each rank's is its own first rollout batch: the probe curves
and the adaptive switch's signals, all-reduced over ranks, stay continuous) and the adaptive switch's state. The
phase itself needs nothing: it follows from ``global_step``, which TRL restores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROBE_FILE = "bupo_probe.pt"  # a list: rank r's probe batch at index r (a bare dict: one probe, older checkpoints)
SWITCH_FILE = "bupo_switch.json"  # the adaptive switch's state, next to the probe in each checkpoint
CHECKPOINT_MARKER = "bupo_checkpoint.json"  # written last: a checkpoint folder without it is incomplete
STAGING_DIR = ".checkpoint-staging"  # not matched by checkpoint-*, so never taken for a checkpoint


def read_checkpoint_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder, or None when absent or unreadable."""
    try:
        data = json.loads((Path(folder) / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is): the marker's files must all be there with
    their recorded sizes; a folder without a marker (saved by plain TRL) needs a readable trainer_state.json and
    no empty file."""
    folder = Path(folder)
    marker = read_checkpoint_marker(folder)
    if marker is not None:
        for f, size in (marker.get("files") or {}).items():
            p = folder / f
            if not p.exists():
                return f"{f} missing"
            if p.stat().st_size != size:
                return f"{f} is {p.stat().st_size} bytes, {size} when saved"
        return None
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except OSError:
        return "no trainer_state.json"
    except ValueError:
        return "trainer_state.json unreadable"
    empty = sorted(p.name for p in folder.iterdir() if p.is_file() and p.stat().st_size == 0)
    if empty:
        return f"empty {', '.join(empty)}"
    return None


@contextlib.contextmanager
def _cpu_map_location(device: torch.device) -> Iterator[None]:
    """Several CPU processes: Trainer loads the optimizer with map_location=args.device = "cpu:<rank>", which
    torch.load cannot restore ("don't know how to restore data location ... cpu:0"); map it to "cpu"."""
    if device.type != "cpu" or device.index is None:
        yield
        return
    real = torch.load

    def load(*a: Any, **kw: Any) -> Any:
        if isinstance(kw.get("map_location"), (str, torch.device)) and torch.device(kw["map_location"]).type == "cpu":
            kw["map_location"] = "cpu"
        return real(*a, **kw)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _file_sizes(folder: Path) -> dict[str, int]:
    """The size of every file of ``folder`` by name (what the marker records; :func:`checkpoint_problem` checks)."""
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}


def rank_probe(saved: Any, rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s probe batch from a checkpoint's :data:`PROBE_FILE`: its own entry of the per-rank list (the
    file of a checkpoint saved before probes were per rank holds one dict, which every rank then takes). Resumed on a
    different number of ranks, rank r takes entry r mod the saved count (one warning: the probe curves, a mean over
    ranks, shift there)."""
    if isinstance(saved, dict):
        return saved
    if len(saved) != world_size and rank == 0:
        logger.warning("the checkpoint's probe batches come from %d ranks, this run has %d: rank r uses saved probe "
                       "r mod %d, so the probe curves (a mean over ranks) shift at the resume", len(saved), world_size,
                       len(saved))
    return saved[rank % len(saved)]


class CheckpointMixin:
    """Staged, fsynced, marked checkpoints and their resume (for :class:`bupo.training.trainer.BuPOTrainer`).

    Uses the trainer's ``bupo_probe``, ``_switch_state()`` / ``_load_switch_state()`` (adaptive switch) and
    ``bupo_run_identity()``; ``bupo_run_extra`` (set by ``bupo train``: model, data) goes into every marker.
    """

    def _init_checkpointing(self) -> None:
        self._bupo_staging = False
        self._bupo_resumed_loss = 0.0  # the loss summed over the optimizer steps before the resumed checkpoint
        self.bupo_run_extra: dict[str, Any] = {}

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        if not getattr(self, "_bupo_staging", False):
            return run_dir
        from bupo.io import Staging

        return os.path.join(run_dir, STAGING_DIR, Staging.OUTPUT_DIR)  # Staging(run_dir, ...).output, on every rank

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        from bupo.io import Staging, atomic_write_json

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # a fresh staging folder (fingerprint None: what a kill left behind is removed, never resumed)
        staging = Staging(run_dir, name=STAGING_DIR, fingerprint=None) if self.args.should_save else None
        self.accelerator.wait_for_everyone()
        self._bupo_staging = True  # TRL and transformers write every file (all ranks) under staging.output
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._bupo_staging = False
        probes = self._gathered_probes()  # a collective: every rank, before rank 0 writes
        self.accelerator.wait_for_everyone()
        if staging is not None:
            folder = staging.output / name
            self._write_bupo_state(str(folder), probes)
            pending = getattr(self, "_tr_loss", None)  # the loss since the last log (transformers' accumulator)
            loss_sum = (self._bupo_resumed_loss + getattr(self, "_total_loss_scalar", 0.0)
                        + (float(pending.item()) if pending is not None else 0.0))
            marker = {"global_step": self.state.global_step, "train_loss_sum": loss_sum, "files": _file_sizes(folder),
                      "run": {**self.bupo_run_identity(), **self.bupo_run_extra}}
            atomic_write_json(folder / CHECKPOINT_MARKER, marker)  # written last
            # fsync every file, then swap checkpoint-N in whole (one of the same step, from a resumed run, goes)
            staging.publish()
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _gathered_probes(self) -> list[dict[str, torch.Tensor] | None]:
        """Every rank's probe batch, in rank order (on every rank; one element in a single process)."""
        from accelerate.utils import gather_object

        return list(gather_object([self.bupo_probe]))

    def _write_bupo_state(self, folder: str, probes: list[dict[str, torch.Tensor] | None]) -> None:
        from bupo.io import atomic_write_json

        if any(p is not None for p in probes):
            torch.save(probes, os.path.join(folder, PROBE_FILE))
        state = self._switch_state()
        if state is not None:  # the adaptive switch must survive a resume
            atomic_write_json(os.path.join(folder, SWITCH_FILE), state)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from bupo.training.launcher import fsdp2_optimizer_resume  # no AdamW state above k while internal

        with _cpu_map_location(self.args.device), fsdp2_optimizer_resume():
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if os.path.exists(os.path.join(checkpoint, PROBE_FILE)):
            saved = torch.load(os.path.join(checkpoint, PROBE_FILE), weights_only=True)
            self._bupo_probe = rank_probe(saved, self.accelerator.process_index, self.accelerator.num_processes)
        if self._switch_state() is not None:
            path = os.path.join(checkpoint, SWITCH_FILE)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {SWITCH_FILE}: it was not saved by an internal_steps='auto' "
                                 "run, so the adaptive switch cannot resume from it")
            with open(path, encoding="utf-8") as f:
                self._load_switch_state(json.load(f))
        marker = read_checkpoint_marker(checkpoint)
        self._bupo_resumed_loss = float(marker.get("train_loss_sum", 0.0)) if marker else 0.0

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> Any:
        # transformers divides the loss summed over THIS segment by global_step; add the resumed part so that
        # train_loss covers the whole run
        self._total_loss_scalar += self._bupo_resumed_loss
        if hasattr(self, "_initial_global_step"):  # transformers >= 5.18 divides by the steps of THIS segment only
            self._initial_global_step = 0
        return super()._finalize_training(trial, num_train_samples, start_time)
