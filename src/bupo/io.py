"""Atomic file writes and resumable staging, shared by every command: a reader (or a resumed run) never sees half
a file, and a finished output is replaced as a whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """ValueError (one line, naming ``flag``) when ``path`` is a file, lies under a file, or its nearest existing
    folder is not writable; creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder; give a folder for the outputs")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any written file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, **kwargs: Any) -> Path:
    """``json.dumps(obj, indent=indent, **kwargs)`` plus a newline, written with :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that want a file name (matplotlib, pyarrow): yields a temporary path in the same folder with
    the same suffix (writers pick the format from it). On a clean exit the file is fsynced and ``os.replace``d
    onto ``path``; on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as atomic_write_text: mkstemp's 0600 is not meant for outputs
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every folder holding one (so the names are durable too)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system can open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Staging:
    """The partial folder of a resumable run: ``<out_dir>/<name>``, kept only for the same inputs, published whole.

    - **Partial work** (shards, a generation cache, ...) lives in :attr:`dir`; :meth:`write_json` /
      :meth:`read_json` and any atomic write under it. It is kept for a later run only when ``resume`` is on and
      that run's ``fingerprint`` (e.g. :func:`bupo.provenance.fingerprint` of every input that changes the result)
      is the one stored with it; otherwise it is removed on construction, so stale work is never mixed in.
      ``fingerprint=None`` never resumes.
    - **The finished output** is assembled in :attr:`output` (files or folders, written however the writer likes:
      :meth:`publish` fsyncs them) and :meth:`publish` moves it into ``out_dir``: first the old ``last`` file (the
      completion marker, e.g. ``summary.json``) goes, then whatever of ``replaces`` the new output lacks, then
      every entry of the new output (a folder replaces a folder of the same name), and ``last`` at the very end.
      A reader that trusts only a folder with its marker therefore sees the old output or the new one, never a
      mix; a crash mid-publish leaves no marker, and the next run with the same fingerprint resumes from the
      partial work and publishes again. Then the partial folder is removed.

    Users:

    - ``bupo analyze`` (:mod:`bupo.analysis.staging`): one Parquet shard per measured batch plus the generated
      traces under ``.bupo_analyze_partial``; fingerprint = model, weights, settings and the inputs' content;
      output = summary.json (``last``), tokens.parquet, traces.jsonl, figures, report.html.
    - Evaluation (``bupo.evaluation.core``, its ``_SampleLog``): ``samples.jsonl`` stays an append-only log in the
      output folder, since its records carry their own key (the ``gen`` hash, :func:`bupo.provenance.fingerprint`
      of the generation settings) and runs of other settings share the file; only results.json (``last``),
      table.md and pass_at_k.png go through ``Staging(out, name=".bupo_eval_partial", fingerprint=gen_hash)``:
      written into :attr:`output`, then :meth:`publish` ``(last="results.json", replaces=(...))``.
    - Checkpoints (``BuPOTrainer._save_checkpoint``): ``Staging(run_dir, name=".checkpoint-staging",
      fingerprint=None)`` (a kill mid-save leaves only this folder, removed by the next save); transformers writes
      ``checkpoint-N`` into :attr:`output` (``_get_output_dir`` returns it while saving), the trainer adds its
      marker inside the folder last, and the main process calls :meth:`publish`, which fsyncs the files and swaps
      ``checkpoint-N`` in whole (replacing one of the same step from a resumed run).
    """

    FINGERPRINT_FILE = "fingerprint.txt"
    OUTPUT_DIR = "output"

    def __init__(self, out_dir: str | os.PathLike, *, name: str, fingerprint: str | None, resume: bool = True):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / name
        stored = self.dir / self.FINGERPRINT_FILE
        self.resumed = bool(resume and fingerprint is not None and stored.is_file()
                            and stored.read_text(encoding="utf-8") == fingerprint)
        if self.dir.exists() and not self.resumed:
            shutil.rmtree(self.dir)  # other inputs (or resume off): stale work must not be mixed in
        shutil.rmtree(self.output, ignore_errors=True)  # an output assembled by an interrupted run is made again
        self.output.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None and not self.resumed:
            atomic_write_text(stored, fingerprint)

    @property
    def output(self) -> Path:
        """Where the finished output is assembled before :meth:`publish`."""
        return self.dir / self.OUTPUT_DIR

    def read_json(self, key: str) -> Any:
        """The JSON value staged under ``key`` (a file name), or None when there is none."""
        f = self.dir / key
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    def write_json(self, key: str, value: Any) -> None:
        atomic_write_text(self.dir / key, json.dumps(value))

    def publish(self, *, last: str | None = None, replaces: Iterable[str] = ()) -> list[Path]:
        """Move the output into ``out_dir`` (see the class docstring); returns the published paths."""
        entries = sorted(self.output.iterdir())
        names = {e.name for e in entries}
        if last is not None and last not in names:
            raise RuntimeError(f"nothing to publish as {last!r}: the staged output has {sorted(names)}")
        _fsync_tree(self.output)
        if last is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.out_dir / last)  # from here on the folder reads as unfinished
        for old in set(replaces) - names:
            self._remove(self.out_dir / old)
        published = []
        for entry in sorted(entries, key=lambda e: e.name == last):  # the marker last
            dest = self.out_dir / entry.name
            if entry.is_dir() and dest.exists():
                aside = self.dir / f"{entry.name}.old"
                os.replace(dest, aside)  # a folder cannot be replaced in one rename; the old one goes aside
            os.replace(entry, dest)
            published.append(dest)
        _fsync_dir(self.out_dir)
        self.discard()
        return published

    def discard(self) -> None:
        """Remove the partial folder (after :meth:`publish`, or when the work is abandoned)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
