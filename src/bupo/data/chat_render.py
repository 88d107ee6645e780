"""A model's chat template rendered within bounds: every bupo prompt made from a chat template goes through here.

A chat template is Jinja code that comes with the model folder. transformers renders it in Jinja's sandbox (no file
or attribute access), but nothing bounds its time: ``{% for i in range(100000) %}{% for j in range(100000) %}``
runs for hours. :func:`apply_chat_template` renders under a time limit (:data:`RENDER_SECONDS`) and turns a
template's syntax or runtime error into one ValueError line; :func:`check_chat_template` renders a one-message
probe when a tokenizer is loaded, so that a broken template is refused before any work.

The limit: on the main thread (Unix) a ``SIGALRM`` timer interrupts the render (the previous handler and timer are
restored); elsewhere the render runs in a daemon thread, stopped by an exception raised inside it when the limit
passes.
Only the standard library is imported at top level.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RENDER_SECONDS", "apply_chat_template", "check_chat_template"]

#: seconds one render may take; real templates take milliseconds, even for long conversations
RENDER_SECONDS = 10.0
_ACCEPTED = "accepted: a Jinja chat template that renders a list of {'role', 'content'} messages"


class _RenderTimeout(BaseException):
    """Raised by the alarm inside the render (a BaseException: no ``except Exception`` on the way swallows it)."""


def _with_alarm(fn: Callable[[], Any], seconds: float) -> Any:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3), outer_interval)


def _in_thread(fn: Callable[[], Any], seconds: float) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="bupo-chat-template", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        _stop_thread(t)
        raise _RenderTimeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stop_thread(t: threading.Thread, grace: float = 2.0) -> None:
    """Raise :class:`_RenderTimeout` inside ``t`` (CPython's ``PyThreadState_SetAsyncExc``; a Jinja render is Python
    code, so it stops at its next bytecode) and wait up to ``grace`` s. Left running, an abandoned render holds the
    GIL half the time for the rest of the process and slows every other thread's Python many times over."""
    import ctypes

    if t.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(_RenderTimeout))
        t.join(grace)


def _bounded(fn: Callable[[], Any], seconds: float) -> Any:
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(fn, seconds)
    return _in_thread(fn, seconds)


def apply_chat_template(tokenizer: Any, messages: list[dict], *, where: str = "the tokenizer's chat template",
                        **extra: Any) -> Any:
    """``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)``, bounded
    in time; a one-line ValueError for a template that does not compile, fails, or runs past
    :data:`RENDER_SECONDS`."""
    return _render(tokenizer, messages, where, extra, tolerate_raise=False)


def check_chat_template(tokenizer: Any, where: str) -> None:
    """Render a one-message probe through the tokenizer's chat template, if it has one (see
    :func:`apply_chat_template`). A template that refuses this probe with its own ``raise_exception`` (it may
    want a system message) is left to the prompts that are really rendered."""
    if getattr(tokenizer, "chat_template", None):
        _render(tokenizer, [{"role": "user", "content": "1+1"}], f"{where}: the chat template", {},
                tolerate_raise=True)


def _render(tokenizer: Any, messages: list[dict], where: str, extra: dict[str, Any], *, tolerate_raise: bool) -> Any:
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    def render() -> Any:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    try:
        return _bounded(render, RENDER_SECONDS)
    except _RenderTimeout:
        raise ValueError(f"{where} did not finish rendering a prompt within {RENDER_SECONDS:g} s (a loop that "
                         f"runs for ever?); {_ACCEPTED} in milliseconds") from None
    except TemplateSyntaxError as exc:
        raise ValueError(f"{where} is not valid Jinja (line {exc.lineno}: {exc.message}); {_ACCEPTED}") from None
    except Exception as exc:  # noqa: BLE001 - the template's own failure (raise_exception, undefined, type errors)
        if tolerate_raise and type(exc) is TemplateError:  # the template's raise_exception: it refused the probe
            return None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"{where} failed while rendering a prompt ({type(exc).__name__}: {first}); "
                         f"{_ACCEPTED}") from None
