"""The ``bupo`` command. Each subcommand lives next to the code it drives and registers itself here.

Subcommand modules import only the standard library at top level, so ``bupo --help`` stays fast;
heavy imports (torch, transformers, trl) happen inside their handlers.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from bupo import __version__
from bupo.cli_common import BupoArgumentParser, add_both_spellings
from bupo.cli_quiet import quiet_libraries, wants_library_output

# modules that define ``register(subparsers) -> None``
_SUBCOMMANDS: list[str] = [
    "bupo.zoo.cli",
    "bupo.analysis.cli",
    "bupo.training.cli",
    "bupo.evaluation.cli",
    "bupo.experiments.demo",
    "bupo.experiments.reproduce",
    "bupo.recipes.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = BupoArgumentParser(
        prog="bupo",
        description="Bottom-up Policy Optimization: read, analyse and train the internal policies of decoder LMs.",
    )
    parser.add_argument("--version", action="version", version=f"bupo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    add_both_spellings(parser)  # --max-new-tokens and --max_new_tokens everywhere (docs/cli.md)
    return parser


#: exit status of a command whose reader closed the pipe (``bupo model info | head``), as a shell reports SIGPIPE
EXIT_BROKEN_PIPE = 128 + 13


def _closed_pipe() -> int:
    """The reader of stdout went away: send what is still buffered to /dev/null (so that the interpreter's own flush
    at exit does not raise again) and stop quietly, as ``cat`` does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Run one ``bupo`` command; its exit status. A reader that closes the pipe early (``| head``) ends it quietly."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except SystemExit:  # --help, --version and usage errors print, then exit through argparse
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _closed_pipe()
        raise


#: the OSErrors that mean "this folder cannot take the files" (full disk, quota, file size limit, read-only mount)
_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file is too large for the file system", errno.EROFS: "the file system is read-only"}
EXIT_DIVERGED = 1  # training stopped on NaN/inf (not bad input: the settings were possible, the run diverged)


def no_room(exc: BaseException) -> OSError | None:
    """The full-disk OSError behind ``exc`` (itself, or its cause/context chain), or None. Libraries that wrap it
    (safetensors, torch.save) keep its words: "No space left on device" then counts as ENOSPC."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return e
        if "No space left on device" in str(e) or "StorageFull" in str(e):
            return OSError(errno.ENOSPC, _NO_ROOM[errno.ENOSPC])
        e = e.__cause__ or e.__context__
    return None


def _no_room_message(err: OSError, args: argparse.Namespace) -> str:
    where = err.filename or next((getattr(args, a) for a in ("out", "compare_out", "output_dir")
                                  if isinstance(getattr(args, a, None), str)), None)
    place = f"writing {where}" if where else "writing its outputs"
    return f"{_NO_ROOM[err.errno]} ({place}): free space there or pick another --out, then rerun"


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if not wants_library_output(args):  # transformers' "Loading weights" bars and the like (bupo.cli_quiet)
        quiet_libraries()
    from bupo.training.launcher import launched_processes

    launched = launched_processes()
    if launched > 1 and args.command != "train":
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(f"bupo {args.command}: error: started as one of {launched} processes by a launcher (WORLD_SIZE="
                  f"{launched}); only bupo train runs under accelerate launch / torchrun: run bupo {args.command} "
                  "as a plain command", file=sys.stderr)
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # bad input: one clear line, no traceback
        print(f"bupo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged (bupo.training.monitor.NonFiniteTraining)
        print(f"bupo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:
        err = no_room(exc)
        if err is None:
            raise
        print(f"bupo {args.command}: error: {_no_room_message(err, args)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
