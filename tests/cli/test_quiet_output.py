"""A ``bupo`` command's stderr holds bupo's own lines, not the libraries' progress bars (transformers' "Loading
weights", datasets' map bars) nor transformers' ``gradient_checkpointing`` FutureWarning nor vLLM's log lines below
ERROR; ``BUPO_VERBOSE=1`` /
``--verbose`` keeps the bars. The evaluation before training reports its progress instead of sitting silent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bupo.cli_quiet import BAR_ENVS, DEEPSPEED_CPU_FALLBACK, VERBOSE_ENV, wants_library_output
from bupo.training.eval_callback import ProgressLines
from support.training import char_tokenizer, make_model

SRC = str(Path(__file__).resolve().parents[2] / "src")
LOADING_BAR = "Loading weights"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("quiet")
    make_model(layers=2).save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}, "data_source": "toy"} for i in range(12)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return d


def _bupo(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (VERBOSE_ENV, *BAR_ENVS)}
    base.update(PYTHONPATH=SRC, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "bupo", *argv], capture_output=True, text=True, env=base, cwd=cwd,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_gguf_dequantisation_bar_is_off_unless_asked_for(tmp_path) -> None:
    from support.gguf import tiny_llama_gguf

    src = tmp_path / "tiny.gguf"
    tiny_llama_gguf(src)
    bar = "de-quantizing GGUF tensors"
    quiet = _bupo("model", "import-gguf", str(src), "--out", str(tmp_path / "quiet"))
    assert quiet.stdout.strip().splitlines()[-1] == str(tmp_path / "quiet")  # converted
    assert bar not in quiet.stderr and "bupo:" in quiet.stderr, quiet.stderr  # bupo's own progress lines stay
    verbose = _bupo("model", "import-gguf", str(src), "--out", str(tmp_path / "verbose"), env={VERBOSE_ENV: "1"})
    assert bar in verbose.stderr  # the bar exists: the quiet run really turned it off


def test_vllm_logs_only_its_errors_unless_asked_for(monkeypatch) -> None:
    import logging

    from bupo.cli_quiet import VLLM_LEVEL_ENV, quiet_libraries

    vllm_logger = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_logger, "level", logging.INFO)  # restored afterwards
    monkeypatch.delenv(VLLM_LEVEL_ENV, raising=False)
    for name in BAR_ENVS:
        monkeypatch.setenv(name, "1")
    quiet_libraries()  # before vLLM is imported: the variable it reads at import
    assert os.environ[VLLM_LEVEL_ENV] == "ERROR"
    monkeypatch.setenv(VLLM_LEVEL_ENV, "DEBUG")
    quiet_libraries()
    assert os.environ[VLLM_LEVEL_ENV] == "DEBUG"  # the user's own setting wins
    assert vllm_logger.level == logging.ERROR
    vllm_logger.setLevel(logging.INFO)
    quiet_libraries()  # the user's DEBUG: vLLM's logger left alone
    assert vllm_logger.level == logging.INFO
    monkeypatch.setenv(VLLM_LEVEL_ENV, "ERROR")
    quiet_libraries()  # vLLM's logger itself: its import-time warnings come before it reads the variable
    assert vllm_logger.level == logging.ERROR


def test_deepspeed_cpu_fallback_line_is_dropped_unless_asked_for() -> None:
    pytest.importorskip("deepspeed")  # installed with the dev extra (CI's main suite)
    code = ("import sys, torch; assert not torch.cuda.is_available(); from bupo.cli_quiet import quiet_libraries\n"
            "if sys.argv[1] == 'quiet': quiet_libraries()\n"
            "import deepspeed; from deepspeed.utils import logger; logger.warning('still here')")
    out = {}
    for mode in ("quiet", "verbose"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": SRC})
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = proc.stdout + proc.stderr
    assert DEEPSPEED_CPU_FALLBACK in out["verbose"]  # DeepSpeed prints it here: the quiet run really dropped it
    assert DEEPSPEED_CPU_FALLBACK not in out["quiet"] and "still here" in out["quiet"], out["quiet"]


def test_verbose_asks_for_the_library_output(monkeypatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not wants_library_output(Namespace(verbose=None)) and not wants_library_output(Namespace())
    assert wants_library_output(Namespace(verbose=True))
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert wants_library_output(Namespace())


def test_model_loading_bar_is_off_unless_asked_for(workspace) -> None:
    argv = ("lens", "--model", str(workspace / "model"), "--prompt", "What is 1 + 1?", "--template", "none")
    quiet = _bupo(*argv)
    assert quiet.stdout.strip()  # the table itself is printed
    assert LOADING_BAR not in quiet.stderr, quiet.stderr
    verbose = _bupo(*argv, env={VERBOSE_ENV: "1"})
    assert LOADING_BAR in verbose.stderr  # the bar exists: the quiet run really turned it off


def test_tiny_train_stderr_has_no_library_bars_or_checkpointing_warning(workspace, tmp_path) -> None:
    proc = _bupo("train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"),
                 "--eval-data", str(workspace / "test.jsonl"), "--out", str(tmp_path / "run"),
                 "--internal-layer", "0", "--internal-steps", "1", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
                 "--eval_samples", "2", "--probe_every", "0", "--save_strategy", "no",
                 "--gradient_checkpointing", "true", cwd=tmp_path)  # TRL toggles it around generation: renamed APIs
    err = proc.stderr
    assert LOADING_BAR not in err and "Map" not in err, err
    assert "FutureWarning" not in err and "gradient_checkpointing" not in err, err
    # the evaluation before training reports its progress (4 problems x 2 samples), first and last line at least
    lines = [ln for ln in err.splitlines() if ln.startswith("eval before training: ")]
    assert lines[0] == "eval before training: 0/4 problems (0/8 samples)", err
    assert lines[-1].startswith("eval before training: 4/4 problems (8/8 samples) in "), err


class _FakeBackend:
    name = "fake"

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def generate(self, requests, settings, on_batch=None):
        for start in range(0, len(requests), self.batch):
            idx = list(range(start, min(start + self.batch, len(requests))))
            on_batch(idx, [f"c{i}" for i in idx])
        return [f"c{i}" for i in range(len(requests))]


def test_progress_lines_count_problems_and_samples_at_a_modest_rate() -> None:
    requests = [(f"p{i}", s) for i in range(5) for s in range(2)]  # 5 problems x 2 samples, problem-major
    seen: list[tuple[list[int], list]] = []
    lines: list[str] = []
    every_batch = ProgressLines(_FakeBackend(4), "eval at step 6", lines.append, every=0)
    out = every_batch.generate(requests, None, lambda i, c: seen.append((i, c)))
    assert out == [f"c{i}" for i in range(10)] and every_batch.name == "fake"
    assert [i for i, _ in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the caller's on_batch still runs
    assert lines[:3] == ["eval at step 6: 0/5 problems (0/10 samples)", "eval at step 6: 2/5 problems (4/10 samples)",
                         "eval at step 6: 4/5 problems (8/10 samples)"]
    assert lines[3].startswith("eval at step 6: 5/5 problems (10/10 samples) in ") and len(lines) == 4
    lines.clear()
    ProgressLines(_FakeBackend(1), "eval before training", lines.append, every=3600).generate(requests, None)
    assert len(lines) == 2  # within the interval: only the first and the last line
