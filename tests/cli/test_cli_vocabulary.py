"""One CLI vocabulary: the table of shared flags in docs/cli.md is checked against the real parsers
(names, defaults, values, old spellings), both spellings of every long option parse, help and errors are sane."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from bupo.cli import build_parser, main
from bupo.cli_common import other_spellings, split_labels, walk_parsers

ROOT = Path(__file__).resolve().parents[2]
TICKS = re.compile(r"`([^`]*)`")


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return dict(walk_parsers(build_parser()))


def _table() -> list[dict[str, str]]:
    lines = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| flag |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


TABLE = _table()


def _commands(row: dict[str, str]) -> list[str]:
    return [c.strip() for c in row["subcommands"].split(",") if c.strip()]


def _per_command(cell: str, commands: list[str]) -> dict[str, str]:
    """``"a: x; b, c: y"`` -> {a: x, b: y, c: y}; a segment without a ``commands:`` prefix is for every command."""
    out: dict[str, str] = {}
    for seg in (s.strip() for s in cell.split(";")):
        head, sep, rest = seg.partition(":")
        names = [n.strip() for n in head.split(",")]
        if sep and "`" not in head and all(n in commands for n in names):
            for n in names:
                out[n] = (out.get(n, "") + " " + rest).strip()
        else:
            for n in commands:
                out[n] = (out.get(n, "") + " " + seg).strip()
    return out


def _values(text: str) -> set[str]:
    return set(TICKS.findall(text))


def _script_default(dest: str):
    """bupo train's own flags default to None (the config layering decides); the effective default is the
    bupo train key's (BuPOScriptArguments), when the flag sets one."""
    from bupo.training.arguments import FLAG_KEYS, BuPOScriptArguments

    key = FLAG_KEYS.get(dest)
    fields = {f.name: f for f in dataclasses.fields(BuPOScriptArguments)}
    return fields[key].default if key in fields else None


def test_the_table_covers_the_shared_flags():
    flags = {TICKS.findall(r["flag"])[0] for r in TABLE}
    assert {"--model", "--dtype", "--template", "--quiet", "--limit", "--train-limit", "--eval-limit", "--out",
            "--labels", "--seed", "--max-new-tokens"} <= flags


@pytest.mark.parametrize("row", TABLE, ids=lambda r: TICKS.findall(r["flag"])[0])
def test_docs_table_matches_the_parsers(parsers, row):
    flag = TICKS.findall(row["flag"])[0]
    commands = _commands(row)
    defaults = _per_command(row["default"], commands)
    values = _per_command(row["values"], commands)
    aliases = _per_command(row["old spellings (aliases)"], commands)
    for cmd in commands:
        p = parsers[cmd]
        assert flag in p._option_string_actions, f"bupo {cmd} has no {flag}"
        action = p._option_string_actions[flag]
        assert flag in action.option_strings, f"bupo {cmd}: {flag} is hidden"
        # default: the first `value` of the cell, `required`, or words (computed at run time: None in the parser)
        ticked = TICKS.findall(defaults[cmd])
        if ticked and ticked[0] == "required":
            assert action.required, f"bupo {cmd} {flag} should be required"
            continue
        default = action.default
        if cmd == "train" and default is None:
            default = _script_default(action.dest)
        expected = ticked[0] if ticked else None
        assert (None if default is None else str(default)) == expected, f"bupo {cmd} {flag}: default {default!r}"
        if action.choices is not None:
            assert set(action.choices) == _values(values[cmd]), f"bupo {cmd} {flag}: {sorted(action.choices)}"
        for old in _values(aliases.get(cmd, "")):
            assert p._option_string_actions.get(old) is action, f"bupo {cmd}: {old} is not an alias of {flag}"
            assert old in action.option_strings  # shown in --help next to the new name


def test_old_spellings_parse_to_the_new_dest(parsers):
    p = build_parser()
    old = p.parse_args(["eval", "--problems", "3", "--no-progress"])
    new = p.parse_args(["eval", "--limit", "3", "--quiet"])
    assert (old.limit, old.quiet) == (new.limit, new.quiet) == (3, True)
    assert p.parse_args(["analyze", "--max-samples", "5"]).limit == 5
    assert p.parse_args(["demo", "--eval-problems", "7", "--analysis-samples", "3"]).eval_problems == 7
    assert p.parse_args(["reproduce", "--eval-problems", "7"]).eval_problems == 7
    proof = p.parse_args(["model", "grpo-proof", "--train-problems", "9", "--eval-problems", "4"])
    assert (proof.train_problems, proof.eval_problems) == (9, 4)
    train = p.parse_args(["train", "--train_rows", "5", "--eval_rows", "6"])
    assert (train.train_limit, train.eval_limit, train.trl_args) == (5, 6, [])


def test_every_long_option_takes_both_spellings(parsers):
    for cmd, p in parsers.items():
        if cmd == "train":
            continue  # below: the other spelling of train's flags is TRL's field
        for action in p._actions:
            for opt in action.option_strings:
                for alt in other_spellings(opt):
                    assert p._option_string_actions.get(alt) is action, f"bupo {cmd}: {alt} (for {opt})"
    p = build_parser()
    a = p.parse_args(["sample", "--layer", "0", "--prompt", "x", "--max_new_tokens", "3", "--top_p", "0.5"])
    b = p.parse_args(["sample", "--layer", "0", "--prompt", "x", "--max-new-tokens", "3", "--top-p", "0.5"])
    assert (a.max_new_tokens, a.top_p) == (b.max_new_tokens, b.top_p) == (3, 0.5)
    proof = p.parse_args(["model", "grpo-proof", "--max_completion_length", "9",
                          "--max-steps", "2", "--learning_rate", "1e-3"])
    assert (proof.max_completion_length, proof.max_steps, proof.learning_rate) == (9, 2, 1e-3)
    # an abbreviation that matches one option under both spellings is not ambiguous
    assert p.parse_args(["analyze", "--top", "0.3"]).top_p == 0.3


def test_train_flags_take_both_spellings(parsers):
    from trl import ModelConfig

    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.config import BuPOConfig

    fields = {f.name for dc in (BuPOConfig, BuPOScriptArguments, ModelConfig) for f in dataclasses.fields(dc)}
    p = parsers["train"]
    for action in p._actions:
        for opt in action.option_strings:
            for alt in other_spellings(opt):
                # ours, or a TRL field: TrlParser (HfArgumentParser) accepts --a_b and --a-b for field a_b
                assert p._option_string_actions.get(alt) is action or alt[2:].replace("-", "_") in fields, alt
    ns = build_parser().parse_args(["train", "--train-limit", "4", "--internal_layer", "2", "--learning-rate", "1"])
    assert ns.train_limit == 4 and ns.trl_args == ["--internal_layer", "2", "--learning-rate", "1"]


def test_labels_take_spaces_and_commas(parsers):
    assert split_labels(["base,grpo", "bupo"]) == split_labels(["base", "grpo", "bupo"]) == ["base", "grpo", "bupo"]
    assert split_labels(None) is None
    for cmd in ("analyze compare", "eval compare"):
        assert parsers[cmd]._option_string_actions["--labels"].nargs == "+"


def test_eval_compare_usage_is_its_own(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "compare", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.startswith("usage: bupo eval compare [-h]"), usage
    assert "[options]" not in usage and usage.count("bupo eval") == 1, usage


def test_analyze_out_shows_its_default(capsys):
    from bupo.analysis.cli import default_out

    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "runs/analysis/<model name>" in " ".join(capsys.readouterr().out.split())
    assert default_out(None) == str(Path("runs/analysis/bundled"))
    assert default_out("/models/SmolLM2-135M/") == str(Path("runs/analysis/SmolLM2-135M"))


def test_train_help_lists_every_bupo_field_and_train_key(capsys):
    from trl import GRPOConfig

    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.config import BuPOConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    bupo = [f.name for f in dataclasses.fields(BuPOConfig) if f.name not in grpo]
    keys = [f.name for f in dataclasses.fields(BuPOScriptArguments) if f.init]
    assert bupo and keys
    for name in [*bupo, *keys, "learning_rate", "max_steps", "num_generations"]:
        assert f"--{name}" in text, name
    assert "(default 0; bupo train without --config: 4)" in " ".join(text.split())  # internal_steps


def test_misspelt_flags_get_the_closest_one(capsys):
    assert _exit_code(["eval", "--limt", "3"]) == 2
    assert "did you mean --limit?" in capsys.readouterr().err
    assert _exit_code(["sample", "--layer", "0", "--prompt", "x", "--tempreture", "1"]) == 2
    assert "did you mean --temperature?" in capsys.readouterr().err


def test_train_unknown_flags_hint_and_mention_underscores_only_for_dashes():
    from bupo.training.arguments import parse_train_args

    with pytest.raises(ValueError) as under:
        parse_train_args(["--learning_rat", "1"], cuda=False)
    assert "did you mean --learning_rate?" in str(under.value) and "underscores" not in str(under.value)
    with pytest.raises(ValueError) as dashed:
        parse_train_args(["--learning-rat", "1"], cuda=False)
    assert "did you mean --learning_rate?" in str(dashed.value) and "underscores" in str(dashed.value)
    with pytest.raises(ValueError) as own:
        parse_train_args(["--internal-layr", "1"], cuda=False)
    assert "did you mean --internal-layer?" in str(own.value) and "underscores" not in str(own.value)


def test_dtype_auto_loads_the_checkpoint_dtype_and_template_auto_resolves(tmp_path):
    import torch

    from bupo.analysis.run import load_model
    from bupo.analysis.sample import prompt_ids
    from bupo.data.templates import render_prompt, resolve_template
    from support.training import char_tokenizer, make_model

    make_model().to(torch.bfloat16).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    resolved = resolve_template(tok, "auto")
    expected = tok(render_prompt(tok, [{"role": "user", "content": "hi"}], resolved))["input_ids"]
    assert prompt_ids(tok, "hi", "auto")[-len(expected):] == expected[-len(expected):]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
