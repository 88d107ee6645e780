"""The reward sandbox: worker processes that run a reward call under a hard time limit and are killed when stuck.

A pool of ``pebble.ProcessPool`` workers (started with ``spawn``: a training process holds threads and maybe CUDA,
which ``fork`` would copy half-locked). Each call has two limits:

- the worker's own ``setitimer`` alarm (``timeout`` seconds; the worker's main thread runs the call, so the alarm
  reaches it) interrupts a slow Python-level call cheaply and the worker survives;
- pebble's per-task timeout (``timeout + KILL_GRACE``, counted from when the task starts in a worker, so queued tasks
  do not eat their limit) kills a worker stuck where no signal reaches (C code, a blocked alarm) and starts a new one.

So a batch of n calls costs at most about ``(timeout + KILL_GRACE) * n / workers``. Workers default to the CPU cores
this process may use (divided among the processes of one machine under ``torchrun``/``accelerate``), or
``$BUPO_REWARD_WORKERS``.

Like every ``spawn``-based pool, the workers import the parent's ``__main__`` module as ``__mp_main__``: a script
that trains with an isolated reward must keep its work under ``if __name__ == "__main__":`` (the usual Python rule).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

__all__ = ["KILL_GRACE", "Outcome", "default_workers", "run_calls", "shutdown"]

KILL_GRACE = 2.0  # pebble kills a worker at timeout + this (the worker's own alarm fires first)
# a call still unanswered this long after its batch started (workers that never come up) scores a timeout
START_TIMEOUT = 180.0

# (outcome in {"ok", "error", "timeout"}, value, error message, seconds spent in the call)
Outcome = tuple[str, float, str, float]


def default_workers() -> int:
    """``$BUPO_REWARD_WORKERS``, else the CPU cores available to this process / the processes on this machine."""
    env = os.environ.get("BUPO_REWARD_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"BUPO_REWARD_WORKERS must be an int >= 1, got {env!r}") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


# --------------------------------------------------------------------------------------------
# inside a worker


class _Alarm(BaseException):
    # BaseException so that library code catching Exception cannot swallow it
    pass


_armed = False


def _on_alarm(signum: int, frame: Any) -> None:  # pragma: no cover - runs in the worker
    if _armed:
        raise _Alarm()


def _init_worker() -> None:  # pragma: no cover - runs in the worker
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGALRM, _on_alarm)
    # imported up front so that the first call's time limit is fair; when missing, math_verify calls count as
    # errors naming the package
    with contextlib.suppress(ImportError):
        import math_verify  # noqa: F401


def _run(func: Callable[[str, str], float], completion: str, ground_truth: str, timeout: float) -> Outcome:
    """One call in a worker, under the alarm; never raises."""
    global _armed
    t0 = time.perf_counter()
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            value = float(func(completion, ground_truth))
        finally:
            _armed = False  # first: an alarm arriving now must not escape the finally
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "ok", value, "", time.perf_counter() - t0
    except _Alarm:
        return "timeout", 0.0, "", time.perf_counter() - t0
    except Exception as exc:  # RecursionError and MemoryError included
        return "error", 0.0, f"{type(exc).__name__}: {exc}"[:500], time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# the pool (parent side)

_lock = threading.Lock()
_pool: Any = None
_pool_key: tuple[int, int] | None = None  # (pid, workers)


def _get_pool(workers: int) -> Any:
    global _pool, _pool_key
    import multiprocessing

    from pebble import ProcessPool

    with _lock:
        key = (os.getpid(), workers)
        if _pool is not None and _pool_key == key:
            return _pool
        if _pool is not None and _pool_key is not None and _pool_key[0] == os.getpid():
            _pool.stop()  # another size was asked for
            _pool.join(timeout=10)
        # a pool inherited across fork belongs to the parent: leave it alone, make a new one
        _pool = ProcessPool(max_workers=workers, initializer=_init_worker,
                            context=multiprocessing.get_context("spawn"))
        _pool_key = key
        return _pool


@atexit.register
def shutdown() -> None:
    """Stop the worker processes (also at interpreter exit); the next call starts new ones."""
    global _pool, _pool_key
    with _lock:
        pool, key = _pool, _pool_key
        _pool = _pool_key = None
    if pool is not None and key is not None and key[0] == os.getpid():
        pool.stop()
        pool.join(timeout=10)


def run_calls(
    func: Callable[[str, str], float],
    pairs: Sequence[tuple[str, str]],
    timeout: float,
    workers: int | None = None,
) -> list[Outcome]:
    """Run ``func(completion, ground_truth)`` for every pair in the worker pool; one :data:`Outcome` per pair, in
    order. ``func`` must be importable by name (a module-level function). Never raises for a bad call."""
    from pebble import ProcessExpired

    if not pairs:
        return []
    pool = _get_pool(workers or default_workers())
    t0 = time.monotonic()
    futures = []
    for completion, gt in pairs:
        try:
            futures.append(pool.schedule(_run, args=(func, completion, gt, timeout), timeout=timeout + KILL_GRACE))
        except Exception as exc:  # the pool is broken (e.g. stopped from another thread): this call fails
            futures.append(exc)
    # the backstop only matters when workers cannot start; each task has its own limit once it runs
    backstop = START_TIMEOUT + (timeout + KILL_GRACE) * len(pairs)
    out: list[Outcome] = []
    for f in futures:
        if isinstance(f, Exception):
            out.append(("error", 0.0, f"{type(f).__name__}: {f}"[:500], 0.0))
            continue
        try:
            out.append(f.result(timeout=max(0.0, backstop - (time.monotonic() - t0))))
        except FutureTimeout:
            if not f.done():
                f.cancel()
            out.append(("timeout", 0.0, "", timeout + KILL_GRACE))  # killed by pebble (or never ran)
        except ProcessExpired as exc:
            out.append(("error", 0.0, f"reward worker died during the call ({exc})"[:500], 0.0))
        except Exception as exc:  # unpicklable input, a worker that could not start, ...
            out.append(("error", 0.0, f"{type(exc).__name__}: {exc}"[:500], 0.0))
    return out
