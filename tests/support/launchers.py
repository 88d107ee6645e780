"""Launching ``bupo train`` under accelerate with the instrumented probe (support/launch_probe.py): the command, its
environment, the tiny two-phase run's arguments, and the per-rank records it leaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A local port nobody listens on now: each launch its own rendezvous port, so two launches in a row do not meet
    the previous one's port 29500 in TIME_WAIT (``EADDRINUSE``), nor two at once each other."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(config: str) -> list[str]:
    """``accelerate launch`` with a shipped accelerate recipe, on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "src" / "bupo" / "recipes" / "accelerate" / config), "--main_process_port", str(free_port())]


def launcher_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
            **extra}


def train_args(out: Path, completion_tokens: int = 64) -> list[str]:
    from bupo.zoo import bundled_model_path

    # k = 3 of 8 layers; rollout step 1 internal, 2 full; one optimizer step per rollout of 2 x 8 completions
    return ["train", "--model", str(bundled_model_path()), "--algo", "bupo", "--internal-layer", "3",
            "--internal-steps", "1", "--out", str(out), "--eval-data", "none", "--max_steps", "2",
            "--steps_per_generation", "1", "--per_device_train_batch_size", "8", "--num_generations", "8",
            "--max_completion_length", str(completion_tokens), "--save_strategy", "steps", "--save_steps", "1",
            "--probe_every", "1", "--logging_steps", "1", "--disable_tqdm", "true"]


def launch(config: str, probe_dir: Path, args: list[str], *extra: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*accelerate_cmd(config), *extra, str(ROOT / "tests" / "support" / "launch_probe.py"), str(probe_dir), *args]
    return run_group(cmd, env=env or launcher_env(), timeout=timeout)


def run_group(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout the launcher's workers are killed with it (a hung
    rank would otherwise outlive the test, holding its memory and a CPU), and ``TimeoutExpired`` carries what they
    printed."""
    import signal

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_ranks(probe_dir: Path, stem: str = "probe") -> list[dict]:
    return [json.loads((probe_dir / f"{stem}-rank{r}.json").read_text()) for r in (0, 1)]


def samples_by_request(step_dir: Path) -> dict[tuple[str, int, int], str]:
    """An evaluation folder's completions: (benchmark, problem, sample) -> text."""
    recs = [json.loads(line) for line in (step_dir / "samples.jsonl").read_text().splitlines()]
    return {(r["benchmark"], r["problem"], r["sample"]): r["response"] for r in recs}


def one_process_samples(step_dir: Path, backend: object, tokenizer: object, rows: int,
                        samples: int) -> dict[tuple[str, int, int], str]:
    """The completions one process's ``backend`` gives for the requests of an in-training evaluation of the bundled
    task (the settings that ``step_dir/results.json`` records), evaluated into ``step_dir``'s sibling ``one-process``."""
    from bupo.data.datasets import load_benchmarks
    from bupo.evaluation import evaluate

    settings = json.loads((step_dir / "results.json").read_text())["settings"]
    out = step_dir.parent / "one-process"
    evaluate(None, tokenizer, load_benchmarks(["bundled"], rows), n=samples,
             max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"], top_p=settings["top_p"],
             template=settings["template"], seed=settings["seed"], backend=backend, model_id="one-process",
             out_dir=out)
    return samples_by_request(out)
