"""Every bad input is one clear line and exit 2 (nothing written, nothing lost), or an explicit warning;
torn checkpoints are skipped; a resume with other settings is refused; GuardedReward; policy input checks."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from bupo.cli import main
from support.training import char_tokenizer, make_model

pytestmark = pytest.mark.xdist_group("training")
TINY = ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--eval-data", "none", "--internal-layer", "1", "--learning_rate", "1e-2"]


def _rows(n, offset=0, gt=None, user=None):
    return [{"prompt": [{"role": "system", "content": "Put the answer in \\boxed{}."},
                        {"role": "user", "content": f"What is {i} + {i}?" if user is None else user}],
             "reward_model": {"ground_truth": str(2 * i) if gt is None else gt}} for i in range(offset, offset + n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("strict")
    make_model().save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    _jsonl(d / "train.jsonl", _rows(16))
    return d


def _train(ws, out, *argv, data=None):
    return main(["train", "--model", str(ws / "model"), "--data", str(data or ws / "train.jsonl"),
                 "--out", str(out), *TINY, *argv])


def _one_line_error(capsys, rc, message, command="train"):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"bupo {command}: error:")]
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


# ------------------------------------------------------------------ bupo train: bad input -> exit 2, nothing written


def test_out_is_a_file(ws, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    _one_line_error(capsys, _train(ws, f, "--max_steps", "2"), "is a file, not a folder")
    assert f.read_text() == "mine"


def test_out_under_a_file(ws, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    _one_line_error(capsys, _train(ws, f / "run", "--max_steps", "2"), "is a file, so no folder can be made")
    assert f.read_text() == "mine"


def test_out_not_writable(ws, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # root may write anywhere, so the permission is denied through os.access, which the check asks
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    _one_line_error(capsys, _train(ws, locked / "run", "--max_steps", "2"), "is not writable")
    assert list(locked.iterdir()) == []


def test_data_is_a_folder(ws, tmp_path, capsys):
    _one_line_error(capsys, _train(ws, tmp_path / "run", data=tmp_path), "is a folder; give a data file")
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_names_the_file_and_line(ws, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    good = json.dumps(_rows(1)[0])
    bad.write_bytes(good.encode() + b"\n" + good.replace("What", "Qu\xe9").encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
                    + b"\n")
    line = _one_line_error(capsys, _train(ws, tmp_path / "run", data=bad), "not UTF-8")
    assert f"{bad}:2:" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("max_steps: abc\n", "key 'max_steps': 'abc' is not an integer"),
    ("learning_rate: [1, 2]\n", "key 'learning_rate': [1, 2] is not a number"),
    ("seed: 1.5\n", "key 'seed': 1.5 is not an integer"),
    ("bf16: maybe\n", "key 'bf16': 'maybe' is not true or false"),
    ("lr_scheduler_type: sideways\n", "key 'lr_scheduler_type': 'sideways' is not one of"),
])
def test_yaml_value_of_the_wrong_type_names_the_key_in_the_file(ws, tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    line = _one_line_error(capsys, _train(ws, tmp_path / "run", "--config", str(cfg)), message)
    assert str(cfg) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("var", ["LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "LD_LIBRARY_PATH", "ld_audit"])
def test_yaml_env_cannot_set_code_loading_variables(ws, tmp_path, capsys, var):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"env:\n  {var}: /tmp/evil.so\n  HF_HUB_OFFLINE: '1'\n")
    before = os.environ.get(var)
    _one_line_error(capsys, _train(ws, tmp_path / "run", "--config", str(cfg)), f"'env' may not set {var}")
    assert os.environ.get(var) == before


def test_yaml_env_sets_harmless_variables(tmp_path, monkeypatch):
    from bupo.training.arguments import parse_train_args

    monkeypatch.delenv("BUPO_TEST_ENV_14", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("env:\n  BUPO_TEST_ENV_14: 'yes'\ninternal_layer: 1\ninternal_steps: 1\n")
    parse_train_args([], config=str(cfg), cuda=False)
    assert os.environ["BUPO_TEST_ENV_14"] == "yes"
    monkeypatch.delenv("BUPO_TEST_ENV_14")


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "inf"], "temperature must be a finite number > 0"),
    (["--temperature", "nan"], "temperature must be a finite number > 0"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    (["--num_generations", "0"], "num_generations must be >= 1"),
    (["--max_steps", "0"], "max_steps must be >= 1"),
    (["--eval_every", "-1"], "eval_every must be >= 0"),
    (["--algo", "grpo", "--internal-steps", "3"], "--algo grpo trains the full policy only"),
    (["--reward_timeout", "nan"], "reward_timeout must be a finite number"),
])
def test_silent_wrong_settings_are_refused(ws, tmp_path, capsys, argv, message):
    _one_line_error(capsys, _train(ws, tmp_path / "run", *argv), message)
    assert not (tmp_path / "run").exists()


def test_use_vllm_without_vllm(ws, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    _one_line_error(capsys, _train(ws, tmp_path / "run", "--use_vllm", "true"), "--use_vllm true needs vLLM")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rows, message", [
    (_rows(16, gt=""), "ground_truth is empty"),
    (_rows(16, user="   "), "the 'user' message is empty"),
    (_rows(2), "fewer than one generation batch"),
])
def test_bad_rows_are_refused(ws, tmp_path, capsys, rows, message):
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    _one_line_error(capsys, _train(ws, tmp_path / "run", "--max_steps", "2", data=data), message)
    assert not (tmp_path / "run").exists()


def test_internal_steps_covering_the_whole_run_warns(ws, tmp_path, capsys):
    assert _train(ws, tmp_path / "run", "--internal-steps", "5", "--max_steps", "2", "--save_steps", "2") == 0
    out = capsys.readouterr().out
    assert "warning: internal_steps=5 covers the whole run (1 rollout steps" in out
    assert "no full-policy (GRPO) phase" in out


# ------------------------------------------------------------------ torn checkpoints and resume checks


def _torn(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"")  # what a kill inside _save_checkpoint left
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def test_resume_latest_skips_torn_checkpoints_in_one_line(tmp_path, capsys):
    from bupo.training.resume import resolve_resume
    from bupo.training.trainer import CHECKPOINT_MARKER

    good = tmp_path / "checkpoint-4"
    good.mkdir()
    (good / "trainer_state.json").write_text("{}")
    (good / "model.safetensors").write_bytes(b"\1" * 8)
    (good / CHECKPOINT_MARKER).write_text(json.dumps({"files": {"model.safetensors": 8, "trainer_state.json": 2}}))
    _torn(tmp_path / "checkpoint-8")
    short = tmp_path / "checkpoint-6"  # its marker says the weights were longer: truncated since
    short.mkdir()
    (short / "model.safetensors").write_bytes(b"\1" * 4)
    (short / CHECKPOINT_MARKER).write_text(json.dumps({"files": {"model.safetensors": 8}}))
    assert resolve_resume("latest", str(tmp_path)) == str(good)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["bupo train: --resume: skipped incomplete checkpoint-8 (no trainer_state.json); checkpoint-6 "
                   "(model.safetensors is 4 bytes, 8 when saved); resuming from checkpoint-4"]
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-8"), str(tmp_path))


def test_resume_with_only_torn_checkpoints_is_one_line(ws, tmp_path, capsys):
    out = tmp_path / "run"
    _torn(out / "checkpoint-2")
    _one_line_error(capsys, _train(ws, out, "--resume", "--max_steps", "2"),
                    "no complete checkpoint in")
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == ["model.safetensors", "optimizer.pt"]


def test_resume_refuses_other_settings_unless_forced(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(ws, out, "--internal-steps", "2", "--max_steps", "2", "--save_steps", "2") == 0
    capsys.readouterr()
    assert (out / "checkpoint-2" / "bupo_checkpoint.json").exists()
    other = _jsonl(tmp_path / "other.jsonl", _rows(16, offset=50))
    before = sorted(p.name for p in out.rglob("*"))
    line = _one_line_error(capsys, _train(ws, out, "--internal-steps", "3", "--internal-layer", "2",
                                          "--max_steps", "4", "--save_steps", "2", "--resume", data=other),
                           "--resume: the run differs from")
    for part in ("internal_layer 1 -> 2", "internal_steps 2 -> 3", "data ", "data_fingerprint"):
        assert part in line, line
    assert "model" not in line.split("differs from")[1].split(":", 1)[1]  # the same model is not named
    line = _one_line_error(capsys, _train(ws, out, "--internal-steps", "2", "--max_steps", "4", "--save_steps", "2",
                                          "--resume", "--internal_projection", "final_norm"),
                           "internal_projection 'raw' -> 'final_norm'")
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written or lost
    # an explicit override resumes anyway, saying what changed
    assert _train(ws, out, "--internal-steps", "3", "--max_steps", "4", "--save_steps", "2", "--resume",
                  "--force-resume") == 0
    stdout = capsys.readouterr().out
    assert "--force-resume: resuming" in stdout and "internal_steps 2 -> 3" in stdout
    assert json.loads((out / "bupo_run.json").read_text())["global_step"] == 4


# ------------------------------------------------------------------ bupo eval


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
    (["--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--temperature", "nan"], "temperature must be >= 0 and finite"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "tpu:0"], "device"),
])
def test_eval_bad_settings(tmp_path, capsys, argv, message):
    out = tmp_path / "ev"
    _one_line_error(capsys, main(["eval", "--problems", "2", "--out", str(out), "--no-progress", *argv]), message,
                    command="eval")
    assert not out.exists()


def test_eval_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("mine")
    _one_line_error(capsys, main(["eval", "--problems", "2", "--out", str(f), "--no-progress"]), "is a file",
                    command="eval")
    assert f.read_text() == "mine"


def test_eval_refuses_an_encoder_only_model(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    char_tokenizer().save_pretrained(bert)
    out = tmp_path / "ev"
    line = _one_line_error(capsys, main(["eval", "--model", str(bert), "--problems", "2", "--out", str(out),
                                         "--no-progress"]), "is not a decoder-only causal LM", command="eval")
    assert "BertForMaskedLM" in line
    assert not out.exists()


def test_eval_non_utf8_data(tmp_path, capsys):
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"\xff\xfe{}\n")
    line = _one_line_error(capsys, main(["eval", "--data", str(bad), "--out", str(tmp_path / "ev"), "--no-progress"]),
                           "not UTF-8", command="eval")
    assert f"{bad}:1:" in line


def test_generation_api_refuses_inf_and_nan_temperature():
    from bupo.generation import validate_sampling

    for t in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            validate_sampling(max_new_tokens=4, temperature=t, top_p=1.0, top_k=None)
    validate_sampling(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=None)


# ------------------------------------------------------------------ layer_logits / layer_logprobs


@pytest.fixture(scope="module")
def tiny():
    return make_model()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 10_000]]), "token id 10000; ids must be in 0.."),
    (torch.tensor([[1, -3, 2]]), "token id -3"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.tensor([[True, False]]), "integer token ids"),
    (torch.zeros(1, 0, dtype=torch.long), "input_ids is empty"),
    (torch.zeros(0, 3, dtype=torch.long), "input_ids is empty"),
])
def test_layer_logits_and_logprobs_check_the_ids(tiny, ids, message):
    from bupo.internal import layer_logits, layer_logprobs

    with pytest.raises(ValueError, match=message):
        layer_logits(tiny, ids, layer=0)
    with pytest.raises(ValueError, match=message):
        layer_logprobs(tiny, ids, layer=0, **({"targets": torch.zeros_like(ids)} if ids.numel() == 1 else {}))


def test_layer_logprobs_checks_targets_and_temperature(tiny):
    from bupo.internal import layer_logprobs

    ids = torch.tensor([[1, 2, 3]])
    vocab = tiny.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=f"targets holds the token id {vocab}"):
        layer_logprobs(tiny, ids, layer=0, targets=torch.tensor([[1, 2, vocab]]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        layer_logprobs(tiny, ids[:, :1], layer=0)
    for t in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            layer_logprobs(tiny, ids, layer=0, temperature=t)
    assert layer_logprobs(tiny, ids, layer=0).shape == (1, 2)


# ------------------------------------------------------------------ GuardedReward


def test_guarded_reward_refuses_a_string_of_scores():
    from bupo.training.rewards import GuardedReward

    g = GuardedReward(lambda completions, **kw: "11", timeout=None)
    assert g(["a", "b"]) == [0.0, 0.0]
    assert g.errors == 2 and g.correct == 0
    g = GuardedReward(lambda completions, **kw: ["1", 1.0], timeout=None)
    assert g(["a", "b"]) == [0.0, 0.0] and g.errors == 2
    g = GuardedReward(lambda completions, **kw: {"a": 1.0, "b": 1.0}, timeout=5.0)
    assert g(["a", "b"]) == [0.0, 0.0] and g.errors == 2


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_guarded_reward_contains_system_exit(timeout):
    from bupo.training.rewards import GuardedReward

    def bye(completions, **kw):
        raise SystemExit(3)

    g = GuardedReward(bye, timeout=timeout)
    assert g(["a"]) == [0.0] and g.errors == 1
    assert g(["a"]) == [0.0] and g.errors == 2  # and the reward keeps working


def test_guarded_reward_leaves_no_thread_per_timed_out_call():
    from bupo.training.rewards import GuardedReward

    release = threading.Event()

    def stuck(completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    g = GuardedReward(stuck, timeout=0.05, name="stuck")
    before = threading.active_count()
    for _ in range(10):
        assert g(["a", "b"]) == [0.0, 0.0]
    assert g.timeouts == 20
    assert threading.active_count() <= before + 1  # one stuck call, not ten
    release.set()
    deadline = time.monotonic() + 10
    while g._busy.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    fast = GuardedReward(lambda completions, **kw: [1.0] * len(completions), timeout=5.0)
    assert fast(["a"]) == [1.0]
    assert g(["a"]) == [1.0]  # the same thread serves again once the stuck call returned
