"""Atomic file writes, resumable staging and output guards, shared by every command: a reader (or a resumed run)
never sees half a file, a finished output is replaced as a whole or not at all, an output folder has one writer at a
time (:func:`guard_output`) and temporary folders of killed processes are found and removed (:func:`temp_folder`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def check_output_folder(path: str | os.PathLike, flag: str = "--out", *,
                        inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """ValueError (one line, naming ``flag``) when ``path`` is a file, lies under a file, its nearest existing
    folder is not writable, it is one of the ``inputs`` folders (a model read by the command: its files would be
    overwritten) or it lies in bupo's model cache (a cache entry is rebuilt, and its folder replaced, whenever it
    looks torn); creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder; give a folder for the outputs")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: not writable: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")
    real = p.resolve()
    for folder in inputs:
        if folder is not None and Path(folder).is_dir() and Path(folder).resolve() == real:
            raise ValueError(f"{flag} {path}: is the input model folder, whose files would be overwritten; "
                             f"choose another {flag}")
    from bupo.models.registry import cache_root  # standard library only

    cache = cache_root().resolve()
    if real == cache or cache in real.parents:
        raise ValueError(f"{flag} {path}: lies in bupo's model cache {cache} ($BUPO_CACHE), whose entries are "
                         f"replaced when they look torn; choose a {flag} outside it")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """ValueError (one line) when the file ``path`` cannot be written: it is a folder, or its folder cannot be."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name (e.g. {p / 'compare.md'})")
    check_output_folder(p.parent, flag)


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


# ------------------------------------------------------------------------------------ one writer per output folder

LOCK_FILE = ".bupo.lock"
_HELD: dict[Path, int] = {}  # the output folders this process holds (re-entrant: train -> its evaluations)


def _try_flock(fd: int) -> bool:
    """An exclusive advisory lock on ``fd`` without waiting; the kernel drops it when its process dies (kill -9
    included), so a lock is never stale. Without fcntl (not POSIX) every lock is granted."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"{info['command']} (pid {info['pid']} on {info['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _lock_folder(out: Path, command: str, flag: str) -> int:
    """Hold ``out/.bupo.lock`` (a file that records the holder; the lock itself is ``flock``'s, so the file of a
    killed process is simply taken over); ValueError naming the holder when another process has it."""
    path = out / LOCK_FILE
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"{flag} {out}: cannot be written ({exc.strerror or exc})") from None
        if not _try_flock(fd):
            os.close(fd)
            raise ValueError(f"{flag} {out}: in use by {_holder(path)}, which is writing it; wait for it to end "
                             f"or choose another {flag}")
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


@contextlib.contextmanager
def guard_output(out_dir: str | os.PathLike, *, command: str, flag: str = "--out",
                 inputs: Iterable[str | os.PathLike | None] = (), finished: Iterable[str] = (),
                 overwrite: bool = False, what: str = "outputs", hint: str = "", lock: bool = True,
                 recover: bool = True) -> Iterator[list[Path]]:
    """The one guard of a command's output folder, held while the command writes it:

    - :func:`check_output_folder` (a file, not writable, an ``inputs`` model folder, bupo's model cache);
    - one writer at a time (``lock``): a second process gets a one-line ValueError naming the holder's pid; the
      lock of a killed process is taken over; the same process may enter again (a run and its evaluations);
    - ``recover``: a publish that a kill interrupted (:class:`Staging`) is completed, so the folder holds a whole
      output before ``finished`` is looked for (off where several processes share the folder: the next
      :class:`Staging` of it completes the publish then);
    - ``finished``: glob patterns of what a finished output holds (``summary.json``, ``checkpoint-*``): when any
      matches and ``overwrite`` is off, ValueError ``{flag} X: already holds {what} (...); {hint}``.

    Yields what ``finished`` matched (the caller replaces it when ``overwrite`` is on)."""
    out = Path(out_dir)
    check_output_folder(out, flag, inputs=inputs)
    made = not out.exists()
    key = out.resolve()
    fd = None
    if lock and key not in _HELD:
        fd = _lock_folder(out, command, flag)
    if lock:
        _HELD[key] = _HELD.get(key, 0) + 1
    try:
        for journal in sorted(out.glob(f".*/{Staging.JOURNAL}")) if recover and lock else ():
            Staging.finish_publish(out, journal.parent)
        found = sorted({p for pattern in finished for p in out.glob(pattern)})
        if found and not overwrite:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(f"{flag} {out_dir}: already holds {what} ({names}); {hint or 'choose another ' + flag}")
        yield found
    finally:
        if lock and _HELD[key] == 1:
            del _HELD[key]
        elif lock:
            _HELD[key] -= 1
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(out / LOCK_FILE)  # still holding the lock: a waiter that opened it re-checks
            os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # made here and left empty (bad input found later): nothing written


@contextlib.contextmanager
def temp_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new folder ``parent/.{prefix}.tmp-XXXX`` (mode 0755), locked while this process uses it, removed at the
    end unless it was renamed away (the caller's atomic ``os.replace`` into place). First the ones of ``prefix``
    that killed processes left behind (unlocked) are removed: a kill -9 leaves nothing for good."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stem = f".{prefix}.tmp-"
    for old in parent.glob(stem + "*"):
        with contextlib.suppress(OSError):
            fd = os.open(old, os.O_RDONLY)
            try:
                if _try_flock(fd):
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(fd)
    # made under another name and locked before it gets a name the sweep above matches
    made = Path(tempfile.mkdtemp(prefix=f".{prefix}.new-", dir=parent))
    fd = os.open(made, os.O_RDONLY)
    _try_flock(fd)
    path = parent / (stem + made.name.rsplit("-", 1)[-1])
    try:
        os.rename(made, path)
        os.chmod(path, 0o755)  # mkdtemp's 0700 is not meant for outputs or a shared cache
        yield path
    finally:
        shutil.rmtree(made, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


# ------------------------------------------------------------------------------------------------- staging


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
      :meth:`publish` fsyncs them) and :meth:`publish` swaps it into ``out_dir`` as one transaction: a journal
      names the new entries, then the old ones (the old ``last`` file, the completion marker such as
      ``summary.json``, first; then every entry of the new output and of ``replaces``) are renamed aside, then the
      new entries are renamed in, ``last`` at the very end. An error on the way (a full disk) renames everything
      back: the old output stays whole. A kill on the way leaves the journal; the next :class:`Staging` of that
      folder, or :func:`guard_output`, completes the swap (the new output was complete and fsynced before it
      started), so the folder holds the old output or the new one, never a mix. Then the partial folder goes.

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
    JOURNAL = "publishing.json"  # present while a publish swaps entries
    ASIDE_DIR = "replaced"  # the old entries, until the publish completes

    def __init__(self, out_dir: str | os.PathLike, *, name: str, fingerprint: str | None, resume: bool = True):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / name
        if (self.dir / self.JOURNAL).is_file():
            self.finish_publish(self.out_dir, self.dir)  # a kill interrupted the last publish: complete it
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
        """Swap the output into ``out_dir`` (see the class docstring); returns the published paths."""
        names = sorted((e.name for e in self.output.iterdir()), key=lambda n: (n == last, n))  # the marker last
        if last is not None and last not in names:
            raise RuntimeError(f"nothing to publish as {last!r}: the staged output has {sorted(names)}")
        _fsync_tree(self.output)
        old = sorted({*names, *replaces}, key=lambda n: (n != last, n))  # the old marker first
        atomic_write_json(self.dir / self.JOURNAL, {"new": names, "old": old})
        try:
            self._swap(self.out_dir, self.dir, names, old)
        except BaseException:
            self._swap_back(names, old)  # what could not be swapped in: the old output, whole
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / self.JOURNAL)
        _fsync_dir(self.out_dir)
        self.discard()
        return [self.out_dir / n for n in names]

    @classmethod
    def _swap(cls, out_dir: Path, folder: Path, new: list[str], old: list[str]) -> None:
        """Rename the ``old`` entries of ``out_dir`` aside, then the ``new`` ones of ``folder/output`` in; repeated
        after a kill, it carries on where that one stopped (an entry already swapped in stays)."""
        output, aside = folder / cls.OUTPUT_DIR, folder / cls.ASIDE_DIR
        aside.mkdir(exist_ok=True)
        for name in old:
            dest = out_dir / name
            swapped_in = name in new and not os.path.lexists(output / name)
            if os.path.lexists(dest) and not swapped_in and not os.path.lexists(aside / name):
                os.replace(dest, aside / name)
        for name in new:
            if os.path.lexists(output / name):
                os.replace(output / name, out_dir / name)

    def _swap_back(self, new: list[str], old: list[str]) -> None:
        """Undo :meth:`_swap` after an error: the new entries back into :attr:`output`, the old ones back (their
        marker last; should this fail too, the journal stays and the next run completes the swap instead)."""
        aside = self.dir / self.ASIDE_DIR
        for name in new:
            if os.path.lexists(self.out_dir / name) and not os.path.lexists(self.output / name):
                os.replace(self.out_dir / name, self.output / name)
        for name in reversed(old):
            if os.path.lexists(aside / name):
                os.replace(aside / name, self.out_dir / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / self.JOURNAL)

    @classmethod
    def finish_publish(cls, out_dir: Path, folder: Path) -> None:
        """Complete the publish a kill interrupted (its journal is in ``folder``, a partial folder of ``out_dir``)."""
        journal = json.loads((folder / cls.JOURNAL).read_text(encoding="utf-8"))
        cls._swap(Path(out_dir), folder, list(journal["new"]), list(journal["old"]))
        os.unlink(folder / cls.JOURNAL)
        _fsync_dir(Path(out_dir))
        shutil.rmtree(folder / cls.ASIDE_DIR, ignore_errors=True)

    def discard(self) -> None:
        """Remove the partial folder (after :meth:`publish`, or when the work is abandoned)."""
        shutil.rmtree(self.dir, ignore_errors=True)

