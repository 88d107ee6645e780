"""The paper's reward: boxed exact match (verl's ``reward_score.math.compute_score``, the EleutherAI/Hendrycks MATH
scorer), re-implemented behaviour for behaviour:

- the answer is the content of the LAST ``\\boxed{...}`` (brace-matched). If the text contains
  ``\\boxed `` (with a space) anywhere, that form wins: the answer is everything after the last
  ``\\boxed `` up to the next ``$``. Without any ``\\boxed``, the last ``\\fbox{...}`` is found, but the
  paper's scorer then rejects it (verl's ``remove_boxed`` asserts a ``\\boxed{`` prefix), so an
  ``\\fbox`` answer scores 0.0 — kept for fidelity; :func:`extract_boxed` still returns its content;
- both strings go through :func:`normalize_answer` (``strip_string``) and are compared for exact
  equality; when the normaliser fails on either string (a trailing ``\\sqrt``, two ``\\text{ ``
  units, ...) the raw strings are compared instead, as verl does;
- an empty (or blank) ground truth never matches: ``\\boxed{}`` would otherwise score 1.0 against it.

Only linear-time string operations: a 1e6-character input takes milliseconds, so it runs in-process.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["boxed_exact_raw", "check_strings", "extract_boxed", "is_equiv", "normalize_answer"]


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


def check_strings(completion: object, ground_truth: object) -> None:
    """TypeError unless both are str (the reward callers count it as an error, scoring 0.0)."""
    if not isinstance(completion, str) or not isinstance(ground_truth, str):
        raise TypeError(
            f"completion and ground_truth must be str, got {type(completion).__name__} and "
            f"{type(ground_truth).__name__}"
        )


def boxed_exact_raw(completion: str, ground_truth: str) -> float:
    """The scorer proper, unguarded (1.0/0.0; TypeError for non-strings). Use :func:`bupo.rewards.boxed_exact`."""
    check_strings(completion, ground_truth)
    if not ground_truth.strip():
        return 0.0  # nothing to match: an empty box must not count as right
    found = _last_boxed(completion)
    if found is None or found[0] == "fbox":  # \fbox: the paper's scorer rejects it (module docstring)
        return 0.0
    return 1.0 if is_equiv(found[1], ground_truth) else 0.0


# --------------------------------------------------------------------------------------------
# final_number: a scorer that gives signal on small models
# --------------------------------------------------------------------------------------------

# an optionally signed integer or decimal; thousands separators ("1,234") are allowed inside
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|(?<![\w.])-?\d+(?:\.\d+)?")


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def final_number_raw(completion: str, ground_truth: str) -> float:
    """The final_number scorer, unguarded (use :func:`bupo.rewards.final_number`): the last number inside the last
    ``\\boxed{}`` when there is one, else the last number of the completion, compared exactly as fractions."""
    check_strings(completion, ground_truth)
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
