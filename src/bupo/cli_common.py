"""The one CLI vocabulary of every ``bupo`` subcommand (docs/cli.md): shared flags, their defaults and values, old
spellings kept as aliases, both spellings of every long option (``--max-new-tokens`` and ``--max_new_tokens``) and
closest-flag hints for misspelt flags. Standard library only (``bupo --help`` stays fast).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from bupo.data.templates import TEMPLATES

# --dtype of the commands that load a model themselves (bupo train's --dtype is TRL's ModelConfig field instead)
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("weights dtype: auto (the checkpoint's own, from its config: transformers' dtype='auto'), float32, "
              "bfloat16 or float16 (default auto)")
# --template: auto + the template names (bupo.data.templates is standard library only: cheap at CLI build time)
TEMPLATE_CHOICES = ("auto", *TEMPLATES)
TEMPLATE_HELP = ("prompt template: auto (the one bupo train recorded in the tokenizer, else qwen3_no_thinking if the "
                 "chat template honours enable_thinking, else chat, else octothinker), qwen3_no_thinking, chat or "
                 "octothinker (default auto)")


def add_dtype(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP + extra)


def add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: the only way to let a model folder's own Python code (config.json ``auto_map``)
    run (:func:`bupo.models.load.load_model`; a notice goes to stderr)."""
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   help="run the Python code the model folder ships (config.json auto_map); off by default: "
                        "read that code first")


def add_load_flags(p: argparse.ArgumentParser, dtype_extra: str = "") -> None:
    """The flags of a command that loads a model itself: ``--dtype`` and ``--trust-remote-code``."""
    add_dtype(p, dtype_extra)
    add_trust_remote_code(p)


def add_template(p: argparse.ArgumentParser, *, none: bool = False) -> None:
    choices = (*TEMPLATE_CHOICES, "none") if none else TEMPLATE_CHOICES
    extra = "; none = the prompt verbatim" if none else ""
    p.add_argument("--template", default="auto", choices=choices, help=TEMPLATE_HELP + extra)


def add_quiet(p: argparse.ArgumentParser, *old: str) -> None:
    """``--quiet`` (no progress bars); ``old``: former spellings kept as aliases (``--no-progress``)."""
    p.add_argument("--quiet", *old, dest="quiet", action="store_true", help="no progress bars")


def split_labels(values: Sequence[str] | str | None) -> list[str] | None:
    """``--labels a b``, ``--labels a,b`` and ``--labels a,b c`` all give ``[a, b, (c)]``; None stays None."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    labels = [part.strip() for v in values for part in v.split(",")]
    return [lab for lab in labels if lab] or None


def add_labels(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help=help + "; space- or comma-separated (--labels a b or --labels a,b)")


def other_spellings(option: str) -> list[str]:
    """``--max-new-tokens`` -> ``["--max_new_tokens"]`` and back; short options and plain names: none."""
    if not option.startswith("--") or len(option) <= 3:
        return []
    body = option[2:]
    alts = {body.replace("-", "_"), body.replace("_", "-")} - {body}
    return ["--" + a for a in sorted(alts)]


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct subcommand parsers of ``parser`` by name."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


def walk_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> Iterable[tuple[str, argparse.ArgumentParser]]:
    """``(command path, parser)`` for ``parser`` and every subcommand below it: ("", bupo), ("eval compare", ...)."""
    yield prefix, parser
    for name, sub in subparsers_of(parser).items():
        yield from walk_parsers(sub, f"{prefix} {name}".strip())


def add_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Every long option of ``parser`` and its subcommands also answers to its other spelling (dashes <->
    underscores). The alias is registered with the parser only (hidden from --help); it parses to the same action."""
    for _, p in walk_parsers(parser):
        if getattr(p, "keep_spellings", False):  # bupo train: the other spelling belongs to TRL's parser
            continue
        alias_other_spellings(p, p._actions)


def alias_other_spellings(p: argparse.ArgumentParser, actions: Iterable[argparse.Action]) -> None:
    """Register the other spelling of each long option of ``actions`` with ``p`` (hidden from --help)."""
    for action in list(actions):
        for option in list(action.option_strings):
            for alt in other_spellings(option):
                p._option_string_actions.setdefault(alt, action)


def primary_options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options ``parser`` shows in --help (one per spelling, not the hidden aliases)."""
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _norm(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-").replace("-", "_").lower()


#: short names people type for long flags (other tools' spellings): ``--lr`` means ``--learning_rate``
FLAG_SYNONYMS = {
    "lr": "learning_rate", "bs": "per_device_train_batch_size", "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs", "steps": "max_steps", "wd": "weight_decay", "temp": "temperature",
    "max_tokens": "max_new_tokens",
}


def closest_flag(flag: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``flag`` (a known synonym such as ``--lr`` first, then difflib, ignoring dashes vs
    underscores), or None when nothing is close."""
    by_norm: dict[str, str] = {}
    for c in candidates:
        by_norm.setdefault(_norm(c), c)
    synonym = FLAG_SYNONYMS.get(_norm(flag))
    if synonym in by_norm:
        return by_norm[synonym]
    match = difflib.get_close_matches(_norm(flag), list(by_norm), n=1, cutoff=0.6)
    return by_norm[match[0]] if match else None


def flag_hints(extras: Sequence[str], candidates: Iterable[str]) -> list[str]:
    """``["--limt: did you mean --limit?"]``: one hint for every unknown ``--flag`` in ``extras`` with a close match."""
    cands = list(candidates)
    hints = []
    for arg in extras:
        if arg.startswith("--") and len(arg) > 2:
            best = closest_flag(arg, cands)
            if best:
                hints.append(f"{arg.split('=', 1)[0]}: did you mean {best}?")
    return hints


def unknown_flag_hints(extras: Sequence[str], candidates: Iterable[str]) -> str:
    """``"; --limt: did you mean --limit?"`` for every unknown ``--flag`` in ``extras`` that has a close match."""
    hints = flag_hints(extras, candidates)
    return ("; " + "; ".join(hints)) if hints else ""


_ENTERED: list[argparse.ArgumentParser] = []  # parsers entered by the current parse, outermost first
_ARGS: list[str] = []  # the command line of the current parse


def _known(flag: str, parsers: Sequence[argparse.ArgumentParser]) -> bool:
    name = flag.split("=", 1)[0]
    for p in parsers:
        if name in p._option_string_actions:
            return True
        if p.allow_abbrev and any(o.startswith(name) for o in p._option_string_actions if o.startswith("--")):
            return True
    return False


class BupoArgumentParser(argparse.ArgumentParser):
    """argparse with bupo's vocabulary rules: an abbreviation matching one option under both spellings is not
    ambiguous, and an unknown flag is reported by the subcommand that got it, with the closest valid flag."""

    def parse_known_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        _ENTERED.append(self)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        import sys

        del _ENTERED[:]
        _ARGS[:] = list(sys.argv[1:] if args is None else args)
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = _ENTERED[-1] if _ENTERED else self  # the innermost subcommand saw them last
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str):  # type: ignore[override]
        """argparse's error, led by ``--flg: did you mean --flag?`` for every flag of the command line that no
        parser of this command knows: an unknown flag is the cause when it surfaces as another error (``bupo eval
        --limt 3``: its value taken for a subcommand name), so its hint comes first and argparse's words follow."""
        chain = [p for p in _ENTERED if p is not self] + [self]
        unknown = [a for a in _ARGS if a.startswith("--") and len(a) > 2 and not _known(a, chain)]
        hints = flag_hints(unknown, primary_options(self))
        if not hints and unknown and "unrecognized arguments" not in message:  # (``bupo eval --smaples 2``)
            hints = [f"unknown flag{'s' if len(unknown) > 1 else ''} {' '.join(a.split('=', 1)[0] for a in unknown)}"
                     f" (see {self.prog} --help)"]
        super().error(f"{'; '.join(hints)} ({message})" if hints else message)

    def _get_option_tuples(self, option_string: str):  # type: ignore[override]
        seen: set[int] = set()
        out = []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:  # --top matching --top-p and its alias --top_p: one option
                seen.add(id(t[0]))
                out.append(t)
        return out
