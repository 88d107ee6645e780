"""Hostile training input: impossible numbers (any field, any source) and fp16 on the CPU refused before loading;
layers out of range named before any work; an analysis of another model refused; a run that turns NaN stops at once,
keeping its last good checkpoint; a full disk is one line; YAML values of the wrong shape."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from bupo.cli import main
from support.training import char_tokenizer, make_model, make_trainer

pytestmark = pytest.mark.xdist_group("training")
TINY = ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--eval-data", "none", "--internal-layer", "1", "--learning_rate", "1e-2", "--max_steps", "2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    make_model().save_pretrained(d / "model")  # 4 layers
    char_tokenizer().save_pretrained(d / "model")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(16)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _train(ws, out, *argv):
    return main(["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--out", str(out),
                 *TINY, *argv])


def _one_line(capsys, rc, message, code=2):
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bupo train: error:")]
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test: the refusals come before."""
    import bupo.training.run as run

    def boom(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "policy_model", boom)


# ------------------------------------------------------------------ impossible numbers: one place, every field


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "nan"], "epsilon must be a finite number, got nan"),
    (["--epsilon_high", "inf"], "epsilon_high must be a finite number"),
    (["--max_grad_norm=-inf"], "max_grad_norm must be a finite number"),
    (["--beta", "-1"], "beta must be >= 0, got -1.0"),
    (["--save_steps", "-2"], "save_steps must be >= 0"),
    (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
    (["--warmup_steps", "nan"], "warmup_steps must be a finite number"),
    (["--internal_switch_tolerance", "nan"], "internal_switch_tolerance must be a finite number"),
    (["--reward_weights", "1", "nan"], "reward_weights[1] must be a finite number"),
    (["--lora_dropout", "-0.5"], "lora_dropout must be >= 0"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--learning_rate", "10"], "learning_rate 10 is above 1: AdamW moves every weight"),
    (["--dtype", "float16"], "dtype float16 cannot train on the CPU"),
    (["--fp16", "true"], "fp16 mixed precision needs a GPU"),
    (["--model_init_kwargs", '{"dtype": "float16"}'], "dtype float16 cannot train on the CPU"),
])
def test_impossible_values_are_refused_before_loading(ws, tmp_path, capsys, no_loading, argv, message):
    _one_line(capsys, _train(ws, tmp_path / "run", *argv), message)
    assert not (tmp_path / "run").exists()


def test_the_numbers_check_walks_every_field_of_every_config():
    from trl import ModelConfig

    from bupo.training.arguments import run_settings
    from bupo.training.validation import LEAST_VALUE, check_numbers

    config, script = run_settings(cuda=False)
    check_numbers(config, script, script.model_args)  # the defaults pass
    with pytest.raises(ValueError, match="reward_timeout must be a finite number"):
        script.reward_timeout = float("nan")
        check_numbers(script)
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        check_numbers(ModelConfig(lora_r=-4))
    assert check_numbers(ModelConfig(), *([None] * 2)) is None
    assert set(LEAST_VALUE) == {"max_steps", "local_rank", "top_k"}  # a new exception is a decision, not a default


def test_negative_reward_weights_stay_allowed(ws, tmp_path, capsys, no_loading):
    # a weight of -1 subtracts a reward: meaningful, so it reaches the model loading (here: refused by the fixture)
    with pytest.raises(AssertionError, match="the model was loaded"):
        _train(ws, tmp_path / "run", "--reward", "boxed_exact,final_number", "--reward_weights", "1", "-1")


# ------------------------------------------------------------------ layers out of range: before any work


@pytest.mark.parametrize("argv, flag", [
    (["--internal-layer", "999"], "--internal-layer"),
    (["--internal-layer", "4"], "--internal-layer"),  # L = 4: k = L is one past the last layer
    (["--internal-schedule", "999:1"], "--internal-schedule"),
    (["--internal-schedule", "1:1,4:1"], "--internal-schedule"),
])
def test_a_layer_out_of_range_is_named_before_loading(ws, tmp_path, capsys, no_loading, argv, flag):
    line = _one_line(capsys, _train(ws, tmp_path / "run", *argv), f"{flag}: layer")
    assert "0..3" in line and "paper layer" in line, line
    assert not (tmp_path / "run").exists()


def test_the_policy_check_names_the_range_not_an_index_error():
    from bupo.training.layer import check_internal_policy

    with pytest.raises(ValueError, match=r"must be in 0\.\.3"):
        check_internal_policy(make_model(), char_tokenizer(), [], "chat", 8, "raw")


# ------------------------------------------------------------------ an analysis of another model


def test_an_analysis_of_another_model_is_refused(ws, tmp_path, capsys):
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    summary = {"model": "toy-8", "model_type": "qwen3", "num_layers": 8, "vocab_size": 100,
               "suggested_internal_layer": 5, "projection": "raw"}
    (analysis / "summary.json").write_text(json.dumps(summary))
    line = _one_line(capsys, _train(ws, tmp_path / "run", "--internal-layer", "auto", "--analysis", str(analysis)),
                     "was made on another model")
    assert "num_layers 8 vs 4" in line and "toy-8" in line, line


def test_an_analysis_of_the_same_model_is_used(tmp_path):
    from bupo.provenance import identity_mismatch, model_identity
    from bupo.training.layer import check_analysis_model

    model = make_model()
    ident = model_identity(model, "m")
    (tmp_path / "summary.json").write_text(json.dumps({**ident, "model": "elsewhere/m"}))
    check_analysis_model(tmp_path, model, "m")  # same structure, another path: accepted
    assert identity_mismatch(ident, {**ident, "vocab_size": 7}) == f"vocab_size {ident['vocab_size']} vs 7"


# ------------------------------------------------------------------ NaN during training: stop, keep the last good


class _Poison(TrainerCallback):
    """Sets one weight to NaN at the end of optimizer step ``at`` (as a diverging update would)."""

    def __init__(self, trainer, at):
        self.trainer, self.at = trainer, at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                next(self.trainer.model.parameters()).view(-1)[0] = float("nan")


def _nan_loss_after(trainer, step):
    """The loss forward (grad enabled; rollouts run without grad) gives NaN embeddings once ``step`` steps are done."""

    def hook(module, args, output):
        if torch.is_grad_enabled() and trainer.state.global_step >= step:
            return output * float("nan")
        return output

    return trainer.model.model.embed_tokens.register_forward_hook(hook)


def test_a_nan_gradient_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    from bupo.training.monitor import NonFiniteTraining

    trainer = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, probe_every=0)
    _nan_loss_after(trainer, 3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.add_callback(_Snapshot(before, at=3))
    with pytest.raises(NonFiniteTraining, match="at optimizer step 4: the gradient norm is nan") as info:
        trainer.train()
    assert "checkpoint-2" in str(info.value) and "\n" not in str(info.value)
    assert trainer.state.global_step == 3  # step 4's update never happened: the weights are those after step 3
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


class _Snapshot(TrainerCallback):
    def __init__(self, into, at):
        self.into, self.at = into, at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            self.into.update({n: p.detach().clone() for n, p in model.named_parameters()})


def test_nan_weights_are_never_saved(tmp_path):
    from bupo.training.monitor import NonFiniteTraining

    trainer = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, probe_every=0)
    trainer.add_callback(_Poison(trainer, at=2))
    with pytest.raises(NonFiniteTraining, match="some weights are NaN/inf") as info:
        trainer.train()
    assert "no checkpoint was saved before it" in str(info.value)
    assert not list(tmp_path.glob("checkpoint-*"))
    with pytest.raises(NonFiniteTraining):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_nan_weights_stop_the_next_rollout_in_one_line(tmp_path):
    from bupo.training.monitor import NonFiniteTraining

    trainer = make_trainer(tmp_path, max_steps=4, probe_every=0)
    trainer.add_callback(_Poison(trainer, at=3))  # the sampler would fail on NaN probabilities
    with pytest.raises(NonFiniteTraining, match="the weights are NaN/inf after step 3"):
        trainer.train()


def test_a_diverging_learning_rate_is_one_line_exit_1_and_no_final_model(ws, tmp_path, capsys, monkeypatch):
    import bupo.training.validation as validation

    monkeypatch.setattr(validation, "MAX_LEARNING_RATE", math.inf)  # past the pre-flight bound: the run diverges
    out = tmp_path / "run"
    rc = _train(ws, out, "--learning_rate", "1e38", "--max_steps", "8", "--save_steps", "2", "--probe_every", "0")
    line = _one_line(capsys, rc, "training diverged at optimizer step", code=1)
    assert "learning rate too high, now 1e+38" in line
    assert not (out / "model.safetensors").exists() and not (out / "bupo_run.json").exists()
    for ckpt in out.glob("checkpoint-*"):  # whatever was saved is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(w).all() for w in load_file(ckpt / "model.safetensors").values())


# ------------------------------------------------------------------ a full disk: one line, the path, exit 2


@pytest.mark.parametrize("command", ["train", "analyze", "eval", "model"])
def test_a_full_disk_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path, command):
    import bupo.cli as cli

    path = str(tmp_path / "out" / "results.json")
    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv=None):
        ns = real_parse(argv)
        ns.func = lambda args: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path))
        return ns

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    argv = {"train": ["train"], "analyze": ["analyze"], "eval": ["eval"], "model": ["model", "get", "tiny"]}[command]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and "no space left on the device" in err and path in err, err


def test_a_full_disk_wrapped_by_a_library_and_without_a_file_name(monkeypatch):
    from bupo.cli import _no_room_message, no_room

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as exc:
        err = no_room(exc)
    assert err is not None and err.errno == errno.ENOSPC
    import argparse

    assert "writing runs/x" in _no_room_message(err, argparse.Namespace(out="runs/x"))
    assert no_room(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")) is not None
    assert no_room(OSError(errno.EPIPE, "Broken pipe")) is None and no_room(ValueError("x")) is None


def test_a_real_write_failing_with_enospc_in_eval(monkeypatch, capsys, tmp_path):
    """A write that fails for real (the atomic rename of results.json) reaches the user as one line."""
    real = os.replace

    def full(src, dst, *a, **kw):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "ev"
    rc = main(["eval", "--problems", "2", "--n", "1", "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bupo eval: error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and str(out / "results.json") in lines[0]


# ------------------------------------------------------------------ YAML values of the wrong shape


@pytest.mark.parametrize("yaml_text, expect", [
    ("eval_data: none\n", {"eval_data": ["none"]}),
    ("eval_data: bundled\n", {"eval_data": ["bundled"]}),
    ("reward:\n  - boxed_exact\n  - final_number\n", {"reward": "boxed_exact,final_number"}),
])
def test_yaml_values_take_their_field_shape(tmp_path, yaml_text, expect):
    from bupo.training.arguments import parse_train_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "internal_layer: 1\ninternal_steps: 1\n")
    _, script = parse_train_args([], config=str(cfg), cuda=False)
    for key, value in expect.items():
        assert getattr(script, key) == value


@pytest.mark.parametrize("yaml_text, message", [
    ("eval_data:\n", "key 'eval_data' is empty (null)"),
    ("data:\n  - a.jsonl\n  - b.jsonl\n", "key 'data' takes one value, got a list"),
    ("reward:\n  - boxed_exact\n  - nope\ninternal_steps: 1\n", "unknown reward"),
])
def test_yaml_values_of_the_wrong_shape_are_one_line(ws, tmp_path, capsys, no_loading, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    _one_line(capsys, _train(ws, tmp_path / "run", "--config", str(cfg)), message)


def test_eval_sets_take_one_path_as_one_path(tmp_path):
    from bupo.training.eval_callback import eval_sets

    assert eval_sets("none", None, None) == {}
    assert list(eval_sets("bundled", None, 3)) == ["bundled_test"]
    assert len(eval_sets(["bundled"], None, 3)["bundled_test"]) == 3
    with pytest.raises(FileNotFoundError):
        eval_sets(str(Path(tmp_path) / "missing.jsonl"), None, None)


def test_deepspeed_config_with_its_own_optimizer_is_refused_for_bupo(ws, tmp_path, monkeypatch, capsys):
    """DeepSpeed would build that optimizer and bypass BuPO's parameter groups (ZeRO-3's zero gradients would then
    decay and step the layers above k while internal): one line before loading; GRPO, or a config without the
    block, is not refused for it."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3},
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert _train(ws, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'defines its own "optimizer"' in err and str(ds) in err, err
    assert not (tmp_path / "run").exists()  # nothing loaded or written

    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.validation import check_deepspeed_optimizer
    from support.training import make_config

    check_deepspeed_optimizer(make_config(tmp_path / "g"), BuPOScriptArguments(algo="grpo"))  # GRPO: no groups
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    check_deepspeed_optimizer(make_config(tmp_path / "b"), BuPOScriptArguments(algo="bupo"))  # no block: fine
