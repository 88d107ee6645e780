"""Rewards for math reasoning: the paper's boxed exact-match scorer and a math-verify scorer.

Two plain callables, ``boxed_exact(completion, ground_truth)`` and
``math_verify_reward(completion, ground_truth)``, each returning 1.0 or 0.0, plus TRL-style batch
wrappers built by :func:`make_reward_func`.

``boxed_exact`` is the paper's reward (verl's ``reward_score.math.compute_score``, the
EleutherAI/Hendrycks MATH scorer), re-implemented here behaviour for behaviour:

- the answer is the content of the LAST ``\\boxed{...}`` (brace-matched). If the text contains
  ``\\boxed `` (with a space) anywhere, that form wins: the answer is everything after the last
  ``\\boxed `` up to the next ``$``. Without any ``\\boxed``, the last ``\\fbox{...}`` is found, but the
  paper's scorer then rejects it (verl's ``remove_boxed`` asserts a ``\\boxed{`` prefix), so an
  ``\\fbox`` answer scores 0.0 — kept for fidelity; :func:`extract_boxed` still returns its content;
- both strings go through :func:`normalize_answer` (``strip_string``) and are compared for exact
  equality; when the normaliser fails on either string (a trailing ``\\sqrt``, two ``\\text{ ``
  units, ...) the raw strings are compared instead, as verl does.

Time limits and failure accounting. No reward call ever raises or hangs: an exception scores 0.0 and
counts as an ``error``, a call over its time limit (default 5 s) scores 0.0 and counts as a
``timeout``. Counters live in :class:`RewardStats` objects: one per reward name in the module-level
:data:`STATS` (everything this process scored) and one per wrapper from :func:`make_reward_func`
(``func.stats``, for the trainer to log).

How the limit is enforced:

- ``boxed_exact`` runs in-process (``isolate=False`` by default): it only does linear-time string
  operations (a 1e6-character input takes milliseconds), so its limit is checked after the call — a
  call that took longer than ``timeout`` still scores 0.0 and counts as a timeout;
- ``math_verify`` runs in a persistent worker subprocess (``python -c ...``, not ``multiprocessing``,
  so user scripts are never re-imported). math-verify's own timeout uses ``signal.alarm``, which
  only works in the main thread; here it is disabled (``parsing_timeout=None``,
  ``timeout_seconds=None``) and the worker — whose main thread runs the call — arms its own
  ``setitimer`` alarm, so a slow sympy call is interrupted cheaply and the worker survives. A call
  stuck in C code (which no signal interrupts, e.g. a huge integer power) is caught by the parent's
  deadline (``timeout + 2 s``): the worker is killed and restarted on the next call. This works from
  any thread of the caller; calls are serialised per worker (``BUPO_REWARD_WORKERS`` workers,
  default 1, are used by the batch functions).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "REWARDS",
    "STATS",
    "RewardStats",
    "boxed_exact",
    "extract_boxed",
    "is_equiv",
    "make_reward_func",
    "math_verify_reward",
    "normalize_answer",
    "score",
    "score_batch",
]

DEFAULT_TIMEOUT = 5.0
# the parent's deadline for an isolated call is timeout + this grace (the worker's own alarm fires first)
_KILL_GRACE = 2.0
_WORKER_START_TIMEOUT = 180.0


# --------------------------------------------------------------------------------------------
# answer extraction
# --------------------------------------------------------------------------------------------

_BRACES = re.compile(r"[{}]")


def _last_boxed(text: str) -> tuple[str, str] | None:
    """(kind, content) of the answer the paper's scorer extracts; kind in {"space", "boxed", "fbox"}.

    Follows verl's ``last_boxed_only_string`` + ``remove_boxed``: the ``\\boxed `` form takes
    precedence whenever present; otherwise brace matching starts at the last ``\\boxed`` (or
    ``\\fbox``) and the first ``}`` that brings the depth back to 0 closes it. A ``}`` before any ``{``
    drives the depth negative, so such a box never closes (as in verl).
    """
    if "\\boxed " in text:
        return "space", text.split("\\boxed ")[-1].split("$")[0]
    kind, prefix = "boxed", "\\boxed{"
    start = text.rfind("\\boxed")
    if start < 0:
        kind, prefix = "fbox", "\\fbox{"
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    end = None
    for m in _BRACES.finditer(text, start):
        if m.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                end = m.start()
                break
    if end is None:
        return None
    segment = text[start : end + 1]
    if not segment.startswith(prefix):  # e.g. "\boxed\n{5}": verl's remove_boxed rejects it
        return None
    return kind, segment[len(prefix) : -1]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (brace-matched), or None.

    Also handles ``\\boxed 5`` (a space instead of braces: everything after the last ``\\boxed `` up to
    the next ``$``; this form wins whenever present, as in the paper's scorer) and, when there is no
    ``\\boxed`` at all, the last ``\\fbox{...}``. Unclosed boxes give None. Never raises for a str.
    """
    if not isinstance(text, str):
        return None
    found = _last_boxed(text)
    return None if found is None else found[1]


# --------------------------------------------------------------------------------------------
# normalisation (Hendrycks MATH ``strip_string``, as in verl.utils.reward_score.math)
# --------------------------------------------------------------------------------------------


class _NormalizeError(Exception):
    """The Hendrycks normaliser has inputs it cannot handle; the scorer then compares raw strings."""


def _drop_text_unit(s: str) -> str:
    # "\text{ " is taken to introduce a unit on the right ("5\text{ cm}" -> "5"); more than one is an error
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _NormalizeError("more than one '\\text{ ' unit")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    # "\sqrt3" -> "\sqrt{3}": brace the single character after each \sqrt that is not already braced
    if "\\sqrt" not in s:
        return s
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _NormalizeError("'\\sqrt' with nothing after it")
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _fix_fracs(s: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1{72}" -> "\frac{1}{72}"; a "\frac" followed by a single
    # character leaves the whole string unchanged (as the reference does)
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _NormalizeError("'\\frac' with nothing after it")
        if piece[0] == "{":
            out.append("\\frac" + piece)
        elif len(piece) < 2:
            return s
        elif piece[1] != "{":
            out.append("\\frac{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
        else:
            out.append("\\frac{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    # "3/4" -> "\frac{3}{4}" only for plain integers written canonically
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:  # also raised by int() past Python's 4300-digit limit
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _strip_string(s: str) -> str:
    """The normaliser proper; raises _NormalizeError where the reference implementation raises."""
    s = s.replace("\n", "")
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _drop_text_unit(s)
    # only the escaped "\%" is removed; a bare "%" stays (as in the reference)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # "x=5", "k = 5" -> "5" (a left-hand side of at most two characters, spaces included)
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def normalize_answer(s: str) -> str:
    """Normalise a LaTeX answer the way the Hendrycks MATH / verl scorer does (``strip_string``).

    Drops newlines, ``\\!``, ``\\left``/``\\right``, degree marks, ``\\$``, a right-hand ``\\text{ unit}``,
    ``\\%`` and spaces; ``\\\\`` -> ``\\``; tfrac/dfrac -> frac; prefixes a leading ``.`` with 0 (also
    after a space or ``{``); drops a short ``x=``/``k =`` left-hand side; ``\\sqrt3`` -> ``\\sqrt{3}``;
    ``\\frac12`` -> ``\\frac{1}{2}``; ``0.5`` -> ``\\frac{1}{2}``; ``3/4`` -> ``\\frac{3}{4}`` for integers.

    Where the reference normaliser fails (e.g. a trailing ``\\sqrt``), returns ``s`` unchanged; the
    scorer then compares raw strings (see :func:`is_equiv`).
    """
    try:
        return _strip_string(s)
    except _NormalizeError:
        return s


def is_equiv(answer: str, ground_truth: str) -> bool:
    """Exact equality after :func:`normalize_answer`; raw equality if normalising either one fails."""
    try:
        return _strip_string(answer) == _strip_string(ground_truth)
    except _NormalizeError:
        return answer == ground_truth


def _check_strings(completion: object, ground_truth: object) -> None:
    if not isinstance(completion, str) or not isinstance(ground_truth, str):
        raise TypeError(
            f"completion and ground_truth must be str, got {type(completion).__name__} and "
            f"{type(ground_truth).__name__}"
        )


def _boxed_exact_raw(completion: str, ground_truth: str) -> float:
    _check_strings(completion, ground_truth)
    found = _last_boxed(completion)
    if found is None or found[0] == "fbox":  # \fbox: the paper's scorer rejects it (module docstring)
        return 0.0
    return 1.0 if is_equiv(found[1], ground_truth) else 0.0


# --------------------------------------------------------------------------------------------
# math-verify (runs inside the worker process)
# --------------------------------------------------------------------------------------------


class _GoldUnparsable(Exception):
    pass


_gold_cache: dict[str, list] = {}


def _parse_gold(ground_truth: str) -> list:
    cached = _gold_cache.get(ground_truth)
    if cached is not None:
        return cached
    from math_verify import parse

    # a bare LaTeX answer ("\frac{\pi}{2}") parses best inside \boxed{}; fall back to $...$ and raw text
    candidates = [ground_truth] if "\\boxed" in ground_truth else ["\\boxed{" + ground_truth + "}"]
    candidates += ["$" + ground_truth + "$", ground_truth]
    for text in candidates:
        gold = parse(text, parsing_timeout=None)
        if gold:
            if len(_gold_cache) > 4096:
                _gold_cache.clear()
            _gold_cache[ground_truth] = gold
            return gold
    raise _GoldUnparsable(f"math-verify cannot parse the ground truth {ground_truth[:80]!r}")


def _math_verify_raw(completion: str, ground_truth: str) -> float:
    _check_strings(completion, ground_truth)
    from math_verify import parse, verify

    gold = _parse_gold(ground_truth)
    pred = parse(completion, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


_RAW: dict[str, Callable[[str, str], float]] = {
    "boxed_exact": _boxed_exact_raw,
    "math_verify": _math_verify_raw,
}
# which rewards run in the worker subprocess unless told otherwise
_DEFAULT_ISOLATE = {"boxed_exact": False, "math_verify": True}


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------


@dataclass
class RewardStats:
    """Counters of reward calls: ``calls`` (all), ``errors`` (raised -> 0.0), ``timeouts`` (over the
    limit -> 0.0), ``seconds`` (wall time spent). Thread-safe; ``as_dict()`` for logging."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, outcome: str, seconds: float, error: str | None = None) -> None:
        with self._lock:
            self.calls += 1
            self.seconds += seconds
            if outcome == "error":
                self.errors += 1
                self.last_error = error
            elif outcome == "timeout":
                self.timeouts += 1

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {
                "calls": self.calls,
                "errors": self.errors,
                "timeouts": self.timeouts,
                "seconds": self.seconds,
            }

    def reset(self) -> None:
        with self._lock:
            self.calls = self.errors = self.timeouts = 0
            self.seconds = 0.0
            self.last_error = None


STATS: dict[str, RewardStats] = {name: RewardStats() for name in _RAW}


# --------------------------------------------------------------------------------------------
# the worker subprocess
# --------------------------------------------------------------------------------------------


class _AlarmTimeout(BaseException):
    # BaseException so that library code catching Exception cannot swallow it
    pass


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Serve reward calls: one JSON request per line on stdin, one JSON reply per line on the original stdout."""
    import logging
    import signal
    import warnings

    # keep the protocol channel clean: stray prints from libraries go to stderr
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (imported up front so the first call's time limit is fair)

    def on_alarm(signum, frame):
        raise _AlarmTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        reply: dict[str, Any]
        try:
            signal.setitimer(signal.ITIMER_REAL, float(req["timeout"]))
            try:
                value = _RAW[req["name"]](req["completion"], req["ground_truth"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = {"outcome": "ok", "value": float(value)}
        except _AlarmTimeout:
            reply = {"outcome": "timeout"}
        except Exception as exc:  # RecursionError and MemoryError included
            reply = {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
        proto.write(json.dumps(reply) + "\n")


class _Worker:
    """One reward subprocess, used by one caller at a time; restarted after a kill."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._pid_owner = os.getpid()

    def _start(self) -> None:
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[1])  # the directory that holds bupo/
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from bupo.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        ready = self._read_line(_WORKER_START_TIMEOUT)
        if not isinstance(ready, dict) or not ready.get("ready"):
            self._kill()
            raise RuntimeError("the reward worker subprocess did not start (see stderr)")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()

    def _read_line(self, timeout: float) -> dict | str:
        """The next reply, or "timeout" when the deadline passes, or "eof" when the worker died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return "timeout"
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # EOF: the worker exited (possibly not yet reaped, so poll() may still say running)
                return "eof"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, name: str, completion: str, ground_truth: str, timeout: float) -> tuple[str, float, str]:
        """(outcome, value, error) with outcome in {"ok", "error", "timeout"}."""
        with self._lock:
            if self._pid_owner != os.getpid():  # inherited across fork: the pipes belong to the parent
                self._proc, self._buf, self._pid_owner = None, b"", os.getpid()
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            request = {
                "name": name,
                "completion": completion,
                "ground_truth": ground_truth,
                "timeout": timeout,
            }
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                self._kill()
                return "error", 0.0, f"reward worker died: {exc}"
            reply = self._read_line(timeout + _KILL_GRACE)
            if not isinstance(reply, dict):
                self._kill()
                if reply == "eof":
                    return "error", 0.0, "reward worker died during the call"
                return "timeout", 0.0, ""
            return reply["outcome"], float(reply.get("value", 0.0)), reply.get("error", "")

    def close(self) -> None:
        with self._lock:
            self._kill()


_workers: list[_Worker] = []
_workers_lock = threading.Lock()


def _n_workers() -> int:
    try:
        return max(1, int(os.environ.get("BUPO_REWARD_WORKERS", "1")))
    except ValueError:
        return 1


def _get_workers(n: int) -> list[_Worker]:
    with _workers_lock:
        while len(_workers) < n:
            _workers.append(_Worker())
        return _workers[:n]


@atexit.register
def _close_workers() -> None:
    for w in list(_workers):
        w.close()


# --------------------------------------------------------------------------------------------
# public scoring API
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in _RAW:
        raise ValueError(f"unknown reward {name!r}; accepted: {', '.join(sorted(_RAW))}")


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"reward timeout must be a positive number of seconds, got {timeout!r}")


def _score_one(
    name: str,
    completion: str,
    ground_truth: str,
    timeout: float,
    isolate: bool,
    extra_stats: Sequence[RewardStats],
    worker: _Worker | None = None,
) -> float:
    t0 = time.monotonic()
    error = ""
    if isolate:
        try:
            outcome, value, error = (worker or _get_workers(1)[0]).call(
                name, completion, ground_truth, timeout
            )
        except Exception as exc:  # worker could not start, unserialisable input, ...
            outcome, value, error = "error", 0.0, f"{type(exc).__name__}: {exc}"
    else:
        try:
            value = _RAW[name](completion, ground_truth)
            outcome = "ok"
        except Exception as exc:
            outcome, value, error = "error", 0.0, f"{type(exc).__name__}: {exc}"[:500]
    elapsed = time.monotonic() - t0
    if outcome == "ok" and not isolate and elapsed > timeout:
        outcome, value = "timeout", 0.0  # in-process calls: the limit is checked after the call
    for stats in (STATS[name], *extra_stats):
        stats.record(outcome, elapsed, error or None)
    return value if outcome == "ok" else 0.0


def score(
    name: str,
    completion: str,
    ground_truth: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    isolate: bool | None = None,
    stats: RewardStats | None = None,
) -> float:
    """Score one completion with reward ``name`` ("boxed_exact" or "math_verify"); 1.0 or 0.0.

    Never raises for bad completions (errors/timeouts score 0.0 and are counted in :data:`STATS` and
    ``stats``). ``isolate`` runs the call in the worker subprocess (default: only for math_verify).
    Raises ValueError only for an unknown name or a bad timeout.
    """
    _check_name(name)
    _check_timeout(timeout)
    iso = _DEFAULT_ISOLATE[name] if isolate is None else isolate
    return _score_one(name, completion, ground_truth, timeout, iso, [stats] if stats else [])


def score_batch(
    name: str,
    completions: Sequence[str],
    ground_truths: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    isolate: bool | None = None,
    stats: RewardStats | None = None,
    workers: int | None = None,
) -> list[float]:
    """Score many (completion, ground_truth) pairs; isolated calls are spread over ``workers``
    subprocesses (default ``$BUPO_REWARD_WORKERS`` or 1). Each pair has its own time limit."""
    _check_name(name)
    _check_timeout(timeout)
    if len(completions) != len(ground_truths):
        raise ValueError(
            f"{len(completions)} completions but {len(ground_truths)} ground truths; they must pair up"
        )
    iso = _DEFAULT_ISOLATE[name] if isolate is None else isolate
    extra = [stats] if stats else []
    if not iso:
        return [
            _score_one(name, c, g, timeout, False, extra)
            for c, g in zip(completions, ground_truths, strict=True)
        ]
    pool = _get_workers(min(workers or _n_workers(), max(1, len(completions))))
    if len(pool) == 1:
        return [
            _score_one(name, c, g, timeout, True, extra, pool[0])
            for c, g in zip(completions, ground_truths, strict=True)
        ]
    out = [0.0] * len(completions)

    def run(j: int) -> None:
        # worker j takes every len(pool)-th pair, so each worker is used by one thread only
        for i in range(j, len(completions), len(pool)):
            out[i] = _score_one(name, completions[i], ground_truths[i], timeout, True, extra, pool[j])

    with ThreadPoolExecutor(len(pool)) as ex:
        list(ex.map(run, range(len(pool))))
    return out


def boxed_exact(completion: str, ground_truth: str, *, timeout: float = DEFAULT_TIMEOUT) -> float:
    """The paper's reward: 1.0 if the last boxed answer equals ``ground_truth`` after Hendrycks MATH
    normalisation, else 0.0 (see the module docstring for the exact extraction rules). Never raises."""
    return score("boxed_exact", completion, ground_truth, timeout=timeout)


def math_verify_reward(completion: str, ground_truth: str, *, timeout: float = DEFAULT_TIMEOUT) -> float:
    """1.0 if math-verify finds the completion's answer equivalent to ``ground_truth``, else 0.0.

    The ground truth is parsed as ``\\boxed{gt}`` (then ``$gt$``, then raw) and the completion with
    math-verify's default LaTeX + expression extraction (boxed answers first). Runs in the reward
    worker subprocess with a hard time limit; an unparsable ground truth counts as an error. Never raises.
    """
    return score("math_verify", completion, ground_truth, timeout=timeout)


REWARDS: dict[str, Callable[..., float]] = {
    "boxed_exact": boxed_exact,
    "math_verify": math_verify_reward,
}


# --------------------------------------------------------------------------------------------
# TRL-style wrappers
# --------------------------------------------------------------------------------------------


def _completion_text(completion: Any) -> str:
    """A plain string, or the text of a conversational completion ([{"role", "content"}, ...])."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list | tuple) and all(isinstance(m, dict) for m in completion):
        parts = []
        for m in completion:
            if m.get("role", "assistant") != "assistant":
                continue
            content = m.get("content", "")
            if isinstance(content, list):  # multimodal-style [{"type": "text", "text": ...}]
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            parts.append(str(content))
        return "".join(parts)
    raise ValueError(
        f"a completion must be a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}"
    )


def _ground_truths(n: int, ground_truth: Any, reward_model: Any) -> list[str]:
    if ground_truth is not None:
        gts = [ground_truth] * n if isinstance(ground_truth, str) else list(ground_truth)
    elif reward_model is not None:
        rms = [reward_model] * n if isinstance(reward_model, dict) else list(reward_model)
        gts = []
        for rm in rms:
            if not isinstance(rm, dict) or "ground_truth" not in rm:
                raise ValueError(
                    f"each reward_model entry must be a dict with a 'ground_truth' key, got {rm!r:.100}"
                )
            gts.append(rm["ground_truth"])
    else:
        raise ValueError(
            "the reward needs the ground truth: give a 'ground_truth' column or 'reward_model' dicts "
            "with a 'ground_truth' key"
        )
    if len(gts) != n:
        raise ValueError(f"{n} completions but {len(gts)} ground truths; they must pair up")
    return [g if isinstance(g, str) else str(g) for g in gts]


def make_reward_func(
    name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    isolate: bool | None = None,
    workers: int | None = None,
) -> Callable[..., list[float]]:
    """A TRL reward function ``f(completions, ground_truth=None, reward_model=None, **kwargs) -> list[float]``.

    ``completions`` are strings or conversational lists (assistant contents are joined). The ground
    truth comes from a ``ground_truth`` column or ``reward_model`` dicts (the paper's parquet);
    other keyword arguments TRL passes (prompts, completion_ids, ...) are ignored. ``f.__name__`` is
    ``name`` (TRL logs rewards by it) and ``f.stats`` is a :class:`RewardStats` for this function.
    Unknown name -> ValueError listing the accepted names.
    """
    _check_name(name)
    _check_timeout(timeout)
    stats = RewardStats()

    def reward_func(
        completions: Sequence[Any], ground_truth: Any = None, reward_model: Any = None, **kwargs: Any
    ) -> list[float]:
        texts = [_completion_text(c) for c in completions]
        gts = _ground_truths(len(texts), ground_truth, reward_model)
        return score_batch(name, texts, gts, timeout=timeout, isolate=isolate, stats=stats, workers=workers)

    reward_func.__name__ = name
    reward_func.__qualname__ = name
    reward_func.__doc__ = f"TRL reward function {name!r} (bupo.rewards.make_reward_func)."
    reward_func.stats = stats  # type: ignore[attr-defined]
    return reward_func


# --------------------------------------------------------------------------------------------
# final_number: a reward that gives signal on small models (issue 12)
# --------------------------------------------------------------------------------------------

# an optionally signed integer or decimal; thousands separators ("1,234") are allowed inside
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|(?<![\w.])-?\d+(?:\.\d+)?")


def _as_number(text: str) -> Any:
    from fractions import Fraction

    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def _final_number_raw(completion: str, ground_truth: str) -> float:
    _check_strings(completion, ground_truth)
    gold = _as_number(ground_truth)
    if gold is None:
        raise ValueError(f"final_number needs a numeric ground truth, got {ground_truth!r:.80}")
    found = _last_boxed(completion)
    # a boxed answer is the model's stated answer; otherwise the last number written is taken as it
    text = found[1] if found is not None else completion
    numbers = _NUMBER.findall(text)
    if not numbers:
        return 0.0
    return 1.0 if _as_number(numbers[-1]) == gold else 0.0


def final_number(completion: str, ground_truth: str, *, timeout: float = DEFAULT_TIMEOUT) -> float:
    """1.0 if the completion's final number equals the numeric ``ground_truth``, else 0.0. Never raises.

    The final number is the last number inside the last ``\\boxed{...}`` when there is one, else the last number
    anywhere in the completion (integers or decimals, optional sign, ``1,234`` separators). Compared exactly as
    fractions (``12`` == ``12.0``). Made for small models that answer arithmetic in prose and seldom write
    ``\\boxed{}`` (SmolLM2-135M writes it 0 times in 40 MATH500 samples), where ``boxed_exact`` is always 0 and
    GRPO gets no signal. A non-numeric ground truth scores 0.0 and counts as an error.
    """
    return score("final_number", completion, ground_truth, timeout=timeout)


_RAW["final_number"] = _final_number_raw
_DEFAULT_ISOLATE["final_number"] = False  # regex and integer arithmetic only: linear time, in-process
STATS["final_number"] = RewardStats()
REWARDS["final_number"] = final_number
__all__.append("final_number")
