"""Reward functions as the trainer sees them: guarded (never raise, time-limited) and counted.

:class:`GuardedReward` wraps any synchronous TRL reward callable ``f(prompts, completions, ..., **columns)``. A call
that raises, returns the wrong number of scores, or runs past ``timeout`` seconds scores 0.0 for the whole batch and
is counted (``errors`` / ``timeouts``, in completions); the training loop never sees the exception. Functions from
:func:`bupo.rewards.make_reward_func` already limit and count each completion themselves (``func.stats``); their
counters are folded in, so one place reports both.

Only user-supplied callables get the whole-call ``timeout`` (a thread per call). A timed-out call keeps running in a
daemon thread (Python cannot kill a thread), which cannot block interpreter exit. bupo's own rewards (recognised by
their :class:`bupo.rewards.RewardStats` ``.stats``) are wrapped with ``timeout=None``: they limit each completion
themselves, and a whole-batch limit would wrongly zero a large batch of slow-but-legal completions while the
abandoned call kept using the reward workers.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
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

    def _call(self, kwargs: dict[str, Any]) -> tuple[str, Any]:
        if self.timeout is None:
            try:
                return "ok", self.func(**kwargs)
            except Exception as exc:  # a reward bug must not stop training
                return "error", exc
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["ok"] = self.func(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported below
                box["error"] = exc

        t = threading.Thread(target=run, name=f"reward-{self.__name__}", daemon=True)
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            return "timeout", None
        return ("ok", box["ok"]) if "ok" in box else ("error", box.get("error"))

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        status, out = self._call({"completions": completions, **kwargs})
        if status == "ok":
            try:
                out = [None if r is None else float(r) for r in out]
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
