"""Output folders are never lost: one writer at a time (bupo.io.guard_output: a second process gets one line naming
the holder's pid, exit 2; a killed holder's lock is taken over), a finished run or newer checkpoints are replaced
only with --overwrite, never the input model or bupo's cache, outputs are swapped in whole or not at all, and the
temporary folders of a killed process are removed by the next run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bupo.cli import main
from bupo.io import LOCK_FILE, Staging, guard_output, temp_folder
from bupo.training.resume import claim_output
from support.training import char_tokenizer, make_model

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# a process that holds a folder as `bupo train` would, until it is killed
HOLD = """
import sys, time
from bupo.io import guard_output, temp_folder
if sys.argv[1] == "out":
    with guard_output(sys.argv[2], command="bupo train"):
        print("held", flush=True)
        time.sleep(600)
with temp_folder(sys.argv[2], "model") as tmp:
    (tmp / "weights.bin").write_bytes(b"0" * 1024)
    print("held", flush=True)
    time.sleep(600)
"""
TINY = ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--eval-data", "none", "--internal-layer", "1", "--learning_rate", "1e-2", "--save_steps", "2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("outsafe")
    make_model().save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(16)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _holder(kind: str, path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _one_line(capsys, rc: int, message: str, command: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"bupo {command}: error:")]
    assert "Traceback" not in err and len(lines) == 1 and message in lines[0], err
    return lines[0]


def _train_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--out", str(out), *TINY,
            *extra]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ one writer per folder


def test_a_second_process_on_a_held_folder_gets_one_line_naming_the_holder(ws, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder("out", out)
    try:
        # a real second `bupo train` process: exit 2 before anything is loaded or written
        proc = subprocess.run([sys.executable, "-m", "bupo", *_train_argv(ws, out, "--max_steps", "2")], env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"bupo train: error: --out {out}: in use by bupo train (pid {holder.pid} on {os.uname().nodename}), which "
            "is writing it; wait for it to end or choose another --out"]
        # bupo eval and bupo analyze hold their --out the same way
        _one_line(capsys, main(["eval", "--model", str(ws / "model"), "--out", str(out), "--limit", "1", "--n", "1",
                                "--max-new-tokens", "2"]), f"(pid {holder.pid}", "eval")
        _one_line(capsys, main(["analyze", "--model", str(ws / "model"), "--out", str(out), "--limit", "1"]),
                  f"(pid {holder.pid}", "analyze")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else was written
    finally:
        _kill(holder)
    # the holder was killed (its lock file remains): the next run takes the folder over
    assert (out / LOCK_FILE).is_file()
    with guard_output(out, command="bupo eval"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with guard_output(out, command="bupo eval"):  # the same process may enter again (train -> its evaluations)
            pass
        assert (out / LOCK_FILE).is_file()
    assert list(out.iterdir()) == []  # the lock file goes with the lock


# ------------------------------------------------------------------------ bupo train: never replace a run silently


def _checkpoint(folder: Path, step: int) -> Path:
    d = folder / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "model.safetensors").write_bytes(b"w" * 8)
    return d


def test_a_folder_holding_a_run_needs_resume_or_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "run"
    _checkpoint(out, 2)
    (out / "bupo_run.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    _one_line(capsys, main(_train_argv(ws, out, "--max_steps", "2")),
              f"--out {out}: already holds a training run (bupo_run.json, checkpoint-2); give --resume to continue "
              "it, --overwrite to replace it, or another --out", "train")
    assert _tree(out) == before
    # --overwrite removes the old run (never a file it did not write), then the new one starts from nothing
    (out / "evals" / "step-000002").mkdir(parents=True)
    with claim_output(out, None, True, str(ws / "model")) as checkpoint:
        assert checkpoint is None
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "notes.txt"]


def test_out_is_never_the_model_folder_nor_in_the_cache(ws, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    make_model().save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    before = _tree(model)
    for extra in ([], ["--overwrite"]):
        argv = ["train", "--model", str(model), "--data", str(ws / "train.jsonl"), "--out", str(model), *TINY, *extra]
        _one_line(capsys, main(argv), f"--out {model}: is the input model folder", "train")
    _one_line(capsys, main(["analyze", "--model", str(model), "--out", str(model)]),
              "is the input model folder", "analyze")
    assert _tree(model) == before
    cache = tmp_path / "cache"
    monkeypatch.setenv("BUPO_CACHE", str(cache))
    for argv, command in ((_train_argv(ws, cache / "smollm2-135m-instruct", "--max_steps", "2"), "train"),
                          (["eval", "--model", str(model), "--out", str(cache / "x")], "eval"),
                          (["analyze", "--model", str(model), "--out", str(cache / "x")], "analyze")):
        _one_line(capsys, main(argv), "lies in bupo's model cache", command)
    assert not cache.exists()
    # --overwrite never removes the model being trained from
    out = tmp_path / "run"
    inner = _checkpoint(out, 2)
    with pytest.raises(ValueError, match="--model .* lies in .*, whose run it would remove"), \
            claim_output(out, None, True, str(inner)):
        pass
    assert inner.is_dir()


def test_resuming_an_older_checkpoint_never_drops_newer_ones_without_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "run"
    two, four = _checkpoint(out, 2), _checkpoint(out, 4)
    _one_line(capsys, main(_train_argv(ws, out, "--max_steps", "6", "--resume", str(two))),
              f"--resume {two}: {out} holds newer checkpoints (checkpoint-4)", "train")
    assert two.is_dir() and four.is_dir()
    with claim_output(out, "latest", False, str(ws / "model")) as checkpoint:
        assert checkpoint == str(four)  # the newest: nothing newer to lose
    with claim_output(out, str(two), True, str(ws / "model")) as checkpoint:  # the explicit word
        assert checkpoint == str(two) and two.is_dir() and not four.exists()


def test_a_finished_training_run_is_replaced_only_with_overwrite(ws, tmp_path, capsys):
    """The real thing: a finished run, a second `bupo train` there (refused, nothing changed), then --overwrite."""
    out = tmp_path / "run"
    assert main(_train_argv(ws, out, "--max_steps", "4", "--save_total_limit", "3")) == 0
    capsys.readouterr()
    first = _tree(out)
    assert {"bupo_run.json", "model.safetensors", "checkpoint-4/model.safetensors"} <= set(first)
    _one_line(capsys, main(_train_argv(ws, out, "--max_steps", "2")), "already holds a training run", "train")
    assert _tree(out) == first
    assert main(_train_argv(ws, out, "--max_steps", "2", "--overwrite")) == 0
    assert "--overwrite: removing " in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # none of the old run's
    assert json.loads((out / "bupo_run.json").read_text())["global_step"] == 2
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------- outputs whole or not at all


OLD = {"summary.json": "old", "tokens.parquet": "old", "report.html": "old", "heatmap.png": "old"}
NEW = {"summary.json": "new", "tokens.parquet": "new", "traces.jsonl": "new"}


def _staged(out: Path) -> Staging:
    """A finished output OLD in ``out`` and the new output NEW staged, ready to publish."""
    for name, text in OLD.items():
        (out / name).write_text(text)
    st = Staging(out, name=".partial", fingerprint="f")
    for name, text in NEW.items():
        (st.output / name).write_text(text)
    return st


@pytest.mark.parametrize("fail_at", range(6))
def test_a_full_disk_mid_publish_keeps_the_old_output_whole(tmp_path, monkeypatch, fail_at):
    st = _staged(tmp_path)
    real, calls = os.replace, []

    def full_disk(a, b):
        calls.append(b)
        if len(calls) == fail_at + 2:  # the journal is the first replace
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        st.publish(last="summary.json", replaces=list(OLD))
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == OLD
    assert not (st.dir / Staging.JOURNAL).exists()


@pytest.mark.parametrize("killed_after", range(7))
def test_a_kill_mid_publish_is_completed_by_the_next_run(tmp_path, monkeypatch, killed_after):
    st = _staged(tmp_path)
    real, calls = os.replace, []

    class Killed(BaseException):
        pass

    def killed(a, b):
        if len(calls) == killed_after + 1:
            raise Killed
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(Staging, "_swap_back", lambda self, new, old: None)  # a kill runs no handler
    with pytest.raises(Killed):
        st.publish(last="summary.json", replaces=list(OLD))
    monkeypatch.undo()
    # the next run (its guard, before it looks for a finished output) completes the swap: the new output, whole
    with guard_output(tmp_path, command="bupo analyze", finished=["summary.json"], overwrite=True):
        assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_FILE} == NEW
    assert not (st.dir / Staging.JOURNAL).exists() and not (st.dir / Staging.ASIDE_DIR).exists()


def test_analyze_overwrite_on_a_full_disk_leaves_the_finished_analysis(ws, tmp_path, monkeypatch):
    from bupo.analysis import analyze

    traces = [{"prompt": "What is 1 + 1?", "response": "2 and some more"}, {"prompt": "3 + 4?", "response": "7"}]
    out = tmp_path / "a"
    analyze(str(ws / "model"), traces=traces, out_dir=out, figures=False)
    before = _tree(out)
    real, failed = os.replace, []

    def full_disk(a, b):
        if Path(b).parent == out and Path(b).name == "tokens.parquet" and not failed:
            failed.append(b)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        analyze(str(ws / "model"), traces=traces[:1], out_dir=out, overwrite=True)
    monkeypatch.undo()
    after = _tree(out)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before  # the old analysis, whole
    with pytest.raises(ValueError, match="already holds a finished analysis"):
        analyze(str(ws / "model"), traces=traces[:1], out_dir=out)


# ------------------------------------------------------------------------------------- bad eval paths: one line


def test_eval_label_cannot_leave_runs_eval_and_compare_out_a_folder_is_one_line(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for label in ("../../../x", "a/b", "..", " x"):
        _one_line(capsys, main(["eval", "--model", str(ws / "model"), "--label", label]),
                  f"--label {label!r}: without --out it names the folder runs/eval/<label>", "eval")
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"label": "m", "benchmarks": {}, "average": 0.0}))
    existing = tmp_path / "tables"
    existing.mkdir()
    _one_line(capsys, main(["eval", "compare", str(run), "--out", str(existing)]),
              f"--out {existing}: is a folder; give a file name", "eval")
    assert list(existing.iterdir()) == []


# ------------------------------------------------------------------------------------------ no leftovers


def test_a_killed_processs_temp_folder_is_removed_by_the_next_one(tmp_path):
    holder = _holder("tmp", tmp_path)
    (live,) = tmp_path.glob(".model.tmp-*")
    with temp_folder(tmp_path, "model") as mine:  # a live one (another process converting) is left alone
        assert live.is_dir() and mine.is_dir() and mine != live
    assert not mine.exists() and live.is_dir()
    _kill(holder)  # kill -9 mid-conversion: the folder stays ...
    assert (live / "weights.bin").is_file()
    with temp_folder(tmp_path, "model"):  # ... until the next conversion of that name starts
        assert not live.exists()
    assert list(tmp_path.iterdir()) == []


def test_model_get_removes_what_a_killed_conversion_left(tmp_path, monkeypatch):
    import contextlib

    import bupo.models.gguf as gguf
    import bupo.models.registry as registry

    monkeypatch.setenv("BUPO_CACHE", str(tmp_path))
    name = "smollm2-135m-instruct"
    stale = tmp_path / f".{name}.tmp-killed1"  # what a kill -9 left (no process holds it)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1024)
    torn = tmp_path / f".{name}.torn.tmp-killed2"
    torn.mkdir()

    def fake_import(src, out, **kw):
        (out / "config.json").write_text("{}")
        marker = {"version": registry.MARKER_VERSION, "files": {"config.json": 2}}
        (out / registry.MARKER).write_text(json.dumps(marker))
        return marker

    monkeypatch.setattr(gguf, "import_gguf", fake_import)
    monkeypatch.setattr(registry, "_require_packages", lambda entry: None)
    monkeypatch.setattr(registry, "_gguf_source", lambda entry: contextlib.nullcontext(tmp_path / "x.gguf"))
    (tmp_path / name).mkdir()  # a torn entry: rebuilt and swapped in
    assert registry.prepare_model(name, log=lambda s: None) == tmp_path / name
    assert not stale.exists() and not torn.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != f".{name}.lock") == [name]
