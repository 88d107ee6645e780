"""``bupo train`` killed with SIGKILL at 5 moments (one of them inside a checkpoint save), resumed each time with
``--resume``: the final weights are bitwise those of an uninterrupted run and ``train_loss`` covers the whole run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.training import char_tokenizer, make_model

pytestmark = pytest.mark.xdist_group("kill")
SRC = Path(__file__).resolve().parents[2] / "src"
# a reward the random tiny model earns on some completions, so advantages (and updates) are not all zero
DRIVER = """
import sys
import time
import bupo.rewards.api as api
# 50 ms per completion: every rollout takes a known minimum time, so a kill's random delay (<= 0.6 s) spans at most
# about one more save, whatever the machine's speed (on a fast one the run could otherwise finish before 5 kills)
api._RAW["boxed_exact"] = lambda completion, ground_truth: time.sleep(0.05) or float(completion.count("a") % 2)
from bupo.cli import main
sys.exit(main(sys.argv[1:]))
"""
ARGS = ["--internal-layer", "1", "--internal-steps", "2", "--max_steps", "24", "--save_steps", "2",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--probe_every", "1", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_total_limit", "2",
        "--eval-data", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    make_model().save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    rows = [{"prompt": [{"role": "system", "content": "Put the answer in \\boxed{}."},
                        {"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(96)]  # 24 steps (48 prompts) stay in epoch 0
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "driver.py").write_text(DRIVER)
    return d


def _start(ws: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ws / "driver.py"), "train", "--model", str(ws / "model"), "--data",
           str(ws / "train.jsonl"), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    return text


def _wait_for_a_save(out: Path, proc: subprocess.Popen, since: float, timeout: float = 300) -> bool:
    """True as soon as a checkpoint save starts (its staging folder is made anew: one a kill left behind is older
    than ``since``); False when the run ended first."""
    staging = out / ".checkpoint-staging"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if staging.stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("no checkpoint save started")


def _has_checkpoint(out: Path) -> bool:
    return any(d.name.startswith("checkpoint-") for d in out.glob("checkpoint-*"))


def test_five_kills_then_resume_give_the_uninterrupted_weights(ws, tmp_path):
    ref = tmp_path / "ref"
    _finish(_start(ws, ref))
    ref_summary = json.loads((ref / "bupo_run.json").read_text())
    assert ref_summary["global_step"] == 24 and ref_summary["train_metrics"]["train_loss"] != 0.0

    out = tmp_path / "killed"
    rng = random.Random(14)
    # kill 1: the moment a save starts (mid-save); kills 2-5: a random moment up to 0.6 s after a save started
    # (inside the save, a rollout, an update, or the final save). 12 saves: room for 5 kills on any machine
    delays = [0.0] + [rng.uniform(0.0, 0.6) for _ in range(4)]
    kills, outputs = 0, []
    for i, delay in enumerate(delays):
        since = time.time() - 0.01  # coarse filesystem timestamps
        proc = _start(ws, out, *(["--resume"] if _has_checkpoint(out) else []))
        if not _wait_for_a_save(out, proc, since):
            break  # the run finished before this kill
        time.sleep(delay)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outputs.append(proc.stdout.read())
        kills += 1
        if i == 0:
            # killed mid-save: the half-written checkpoint is only in the staging folder, never a checkpoint-N
            assert not _has_checkpoint(out)
        if i == 2:
            # the torn folder the issue saw (0-byte optimizer.pt, no trainer_state.json), newer than every
            # complete one: --resume must skip it and say so in one line
            torn = out / "checkpoint-1000"
            torn.mkdir()
            (torn / "optimizer.pt").write_bytes(b"")
            (torn / "model.safetensors").write_bytes(b"\0" * 16)
    assert kills == 5, f"only {kills} kills happened before the run finished"
    outputs.append(_finish(_start(ws, out, "--resume")))
    # the first run after the torn folder appeared skipped it, in one line
    assert "--resume: skipped incomplete checkpoint-1000 (no trainer_state.json); resuming from checkpoint-" in outputs[3]

    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["global_step"] == 24
    final, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert final.keys() == want.keys()
    for name in want:
        assert torch.equal(final[name], want[name]), name  # bitwise
    # train_loss averages every optimizer step of the run, not only the last resumed segment
    assert summary["train_metrics"]["train_loss"] == pytest.approx(ref_summary["train_metrics"]["train_loss"],
                                                                   rel=1e-9, abs=1e-12)
