"""CLI papercuts: the hint for a misspelt flag comes first, common short names get their long flag, a closed pipe
ends a command quietly, and the lens text never cuts a probability."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bupo.analysis.lens import format_lens, prob_text
from bupo.cli import EXIT_BROKEN_PIPE, main
from bupo.cli_common import closest_flag

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_a_misspelt_flag_is_named_before_the_error_it_caused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--limt", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bupo eval: error: --limt: did you mean --limit?")
    assert err.index("did you mean") < err.index("invalid choice")  # argparse's own words follow, in brackets


def test_an_unknown_flag_without_a_close_match_is_still_named_first(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--frobnicate", "2"])  # its value would be taken for the subcommand name alone
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bupo eval: error: unknown flag --frobnicate (see bupo eval --help)"), err
    assert err.index("unknown flag") < err.index("invalid choice")


def test_eval_takes_samples_for_samples_per_problem():
    from bupo.cli import build_parser

    args = build_parser().parse_args(["eval", "--samples", "2"])
    assert args.n == 2


def test_commands_other_than_train_refuse_a_multi_process_launch_in_one_line(monkeypatch, capsys, tmp_path):
    """``accelerate launch -m bupo.cli eval`` started 2 processes that both wrote one --out: the second failed on the
    first's lock after loading. Now every process stops at once, and only rank 0 says why."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bupo eval: error: started as one of 2 processes by a launcher (WORLD_SIZE=2); only bupo train runs "
                   "under accelerate launch / torchrun: run bupo eval as a plain command"]
    assert not (tmp_path / "e").exists()
    monkeypatch.setenv("RANK", "1")
    assert main(["analyze", "--out", str(tmp_path / "a")]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process launch runs as usual
    assert main(["model", "list"]) == 0


def test_other_tools_short_names_point_at_the_long_flag():
    from bupo.training.arguments import parse_train_args

    assert closest_flag("--lr", ["--learning_rate", "--seed"]) == "--learning_rate"
    assert closest_flag("--bs", ["--per_device_train_batch_size"]) == "--per_device_train_batch_size"
    assert closest_flag("--lr", ["--seed"]) is None  # a synonym only where its flag exists
    with pytest.raises(ValueError, match=r"--lr: did you mean --learning_rate\?"):
        parse_train_args(["--lr", "1e-5"], cuda=False)


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = ("import sys, bupo.cli as c\n"
            "def big(args):\n"
            "    for i in range(200000): print('line', i)\n"
            "c._run = lambda argv: big(None) or 0\n"
            "sys.exit(c.main([]))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_model_info_into_a_closed_pipe_has_no_traceback():
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run(f"{sys.executable} -m bupo model info | head -c 1 >/dev/null", shell=True, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr


def test_probabilities_never_read_as_zero():
    assert [prob_text(q) for q in (0.523, 0.0042, 3.2e-05, 0.0)] == ["0.52", "0.004", "3.2e-05", "0"]


def test_lens_text_keeps_whole_token_probability_pairs():
    cell = {"entropy": 5.4321, "top": [[" the", 0.31], [" incarcerated", 2.5e-05], [" a", 0.2]]}
    table = {"projections": ["raw"], "positions": [{"position": 3, "context": "abc", "next_token": " x",
                                                    "layers": [{"layer": 0, "paper_layer": 1, "raw": cell}]}]}
    row = format_lens(table, width=34).splitlines()[3]
    assert "' the':0.31" in row and row.rstrip().endswith("…") and "incarc" not in row
    full = format_lens(table, width=80).splitlines()[3]
    assert "' incarcerated':2.5e-05 ' a':0.20" in full


def test_bupo_config_does_not_repeat_transformers_checkpointing_rename_warning(tmp_path):
    import warnings

    from bupo.training.config import BuPOConfig

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = BuPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=True)
        warnings.warn("`gradient_checkpointing` is deprecated elsewhere", FutureWarning, stacklevel=1)  # still shown
    assert cfg.activation_checkpointing is True and cfg.gradient_checkpointing is True  # the value carried over
    msgs = [str(w.message) for w in seen if "gradient_checkpointing" in str(w.message)]
    assert msgs == ["`gradient_checkpointing` is deprecated elsewhere"]
