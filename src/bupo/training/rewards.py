"""Reward functions as the trainer sees them: guarded (never raise, time-limited) and counted.

:class:`GuardedReward` wraps any synchronous TRL reward callable ``f(prompts, completions, ..., **columns)``. A call
that raises, returns the wrong number of scores, or runs past ``timeout`` seconds scores 0.0 for the whole batch and
is counted (``errors`` / ``timeouts``, in completions); the training loop never sees the exception. Functions from
:func:`bupo.rewards.make_reward_func` already limit and count each completion themselves (``func.stats``); their
counters are folded in, so one place reports both.

Only user-supplied callables get the whole-call ``timeout``: they run in one persistent daemon thread per reward.
A timed-out call keeps running there (Python cannot kill a thread); until it returns, further calls score 0.0 as
timeouts at once instead of starting another thread, so a stuck reward leaves at most one thread behind, not one per
call. ``SystemExit`` raised by a reward is an error like any other (only ``KeyboardInterrupt`` goes through); a
result must be a sequence of numbers or None, one per completion (a string such as ``"11"`` is not). bupo's own rewards (recognised by
their :class:`bupo.rewards.RewardStats` ``.stats``) are wrapped with ``timeout=None``: they limit each completion
themselves, and a whole-batch limit would wrongly zero a large batch of slow-but-legal completions while the
abandoned call kept using the reward workers.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


class GuardedReward:
    """A reward callable that never raises and counts failures. ``__name__`` is the wrapped function's name."""

    def __init__(self, func: Callable[..., list], timeout: float | None = 60.0, name: str | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"reward timeout must be > 0 seconds or None, got {timeout!r}")
        self.func = func
        self.timeout = timeout
        self.__name__ = name or getattr(func, "__name__", type(func).__name__)
        self.completions = 0  # completions scored (local process)
        self.errors = 0  # completions scored 0.0 because the call (or one completion, per func.stats) failed
        self.timeouts = 0
        self.correct = 0  # completions scored >= 1.0
        self._inner_seen = (0, 0)
        self._thread: threading.Thread | None = None  # runs user callables when a timeout is set
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Event()

    def _call(self, kwargs: dict[str, Any]) -> tuple[str, Any]:
        if self.timeout is None:
            try:
                return "ok", self.func(**kwargs)
            except (Exception, SystemExit) as exc:  # a reward bug must not stop training
                return "error", exc
        if self._busy.is_set():  # the previous call has not returned yet: do not pile up threads behind it
            return "timeout", None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name=f"reward-{self.__name__}", daemon=True)
            self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._busy.set()
        self._requests.put((kwargs, box, done))
        if not done.wait(self.timeout):
            return "timeout", None
        return ("ok", box["ok"]) if "ok" in box else ("error", box.get("error"))

    def _serve(self) -> None:
        while True:
            kwargs, box, done = self._requests.get()
            try:
                box["ok"] = self.func(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller; SystemExit must not end the thread
                box["error"] = exc
            finally:
                self._busy.clear()
                done.set()

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        status, out = self._call({"completions": completions, **kwargs})
        if status == "ok":
            try:
                if isinstance(out, str | bytes | Mapping) or not hasattr(out, "__len__"):
                    raise TypeError(f"returned {type(out).__name__} {out!r:.50}, not a list of {n} scores")
                out = [None if r is None else _score(r) for r in out]
                if len(out) != n:
                    raise ValueError(f"returned {len(out)} scores for {n} completions")
                if any(r is not None and not math.isfinite(r) for r in out):
                    raise ValueError("returned a non-finite score")
            except Exception as exc:  # malformed output counts as an error
                status, out = "error", exc
        if status != "ok":
            if status == "error":
                self.errors += n
                logger.warning("reward %s raised %r; the batch scores 0.0", self.__name__, out)
            else:
                self.timeouts += n
                logger.warning("reward %s exceeded %.1fs; the batch scores 0.0", self.__name__, self.timeout)
            out = [0.0] * n
        self.completions += n
        self.correct += sum(1 for r in out if r is not None and r >= 1.0)
        self._fold_inner_stats()
        return out

    def _fold_inner_stats(self) -> None:
        stats = getattr(self.func, "stats", None)
        if stats is None or not hasattr(stats, "errors"):
            return
        err, tout = int(stats.errors), int(stats.timeouts)
        self.errors += max(0, err - self._inner_seen[0])
        self.timeouts += max(0, tout - self._inner_seen[1])
        self._inner_seen = (err, tout)

    def counters(self) -> tuple[int, int, int, int]:
        """(completions, correct, errors, timeouts) since construction, this process."""
        return self.completions, self.correct, self.errors, self.timeouts


def _score(r: Any) -> float:
    if isinstance(r, str | bytes | bool):
        raise TypeError(f"returned the score {r!r:.50}, not a number")
    return float(r)


def guard_reward_funcs(reward_funcs: Any, timeout: float | None) -> list:
    """Wrap every synchronous callable (not models, not strings, not async functions) in :class:`GuardedReward`:
    with ``timeout`` seconds per call, except bupo's own reward functions (per-completion limits; counted only)."""
    from trl.trainer.utils import is_async_callable

    from bupo.rewards import RewardStats

    if reward_funcs is None:
        return []
    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    out = []
    for f in funcs:
        if isinstance(f, GuardedReward | str) or not callable(f) or _is_module(f) or is_async_callable(f):
            out.append(f)
        else:
            own = isinstance(getattr(f, "stats", None), RewardStats)  # from bupo.rewards.make_reward_func
            out.append(GuardedReward(f, timeout=None if own else timeout))
    return out


def _is_module(f: Any) -> bool:
    import torch

    return isinstance(f, torch.nn.Module)
