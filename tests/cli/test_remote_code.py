"""A model folder's own Python code runs only with --trust-remote-code on the command line (with a notice on stderr);
a YAML config or model_init_kwargs cannot turn it on; the YAML env: mapping takes an allowlist; and a corrupted
checkpoint or chat template is one line and exit 2 at the CLI before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bupo.cli import main
from bupo.models import bundled_model_path

SRC = Path(__file__).resolve().parents[2] / "src"


def _remote_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """The bundled model re-dressed as a custom architecture whose configuration module writes a marker file when
    it is imported: the marker says the folder's code ran."""
    folder, marker = tmp_path / "remote", tmp_path / "code_ran"
    shutil.copytree(bundled_model_path(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="custom_qwen3",
               auto_map={"AutoConfig": "custom_config.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen3Config\n\n\nclass CustomConfig(Qwen3Config):\n    model_type = 'custom_qwen3'\n")
    (folder / "custom_model.py").write_text(
        "from transformers import Qwen3ForCausalLM\n\nfrom .custom_config import CustomConfig\n\n\n"
        "class CustomModel(Qwen3ForCausalLM):\n    config_class = CustomConfig\n")
    return folder, marker


def _bupo(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "bupo", *argv], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)


def _error_lines(err: str, command: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith(f"bupo {command}: error:")]


@pytest.mark.parametrize("argv", [
    ["lens", "--prompt", "1+1"],
    ["sample", "--layer", "1", "--prompt", "1+1", "--max-new-tokens", "2"],
    ["eval", "--problems", "2", "--n", "1", "--no-progress"],
])
def test_remote_code_is_refused_without_the_flag(tmp_path, capsys, argv):
    folder, marker = _remote_code_model(tmp_path)
    extra = ["--out", str(tmp_path / "out")] if argv[0] == "eval" else []
    assert main([*argv, "--model", str(folder), "--device", "cpu", *extra]) == 2
    lines = _error_lines(capsys.readouterr().err, argv[0])
    assert len(lines) == 1 and "only with --trust-remote-code" in lines[0]
    assert not marker.exists()


def test_the_flag_runs_the_code_with_a_notice(tmp_path):
    folder, marker = _remote_code_model(tmp_path)
    r = _bupo("lens", "--model", str(folder), "--prompt", "1+1", "--device", "cpu", "--trust-remote-code")
    notices = [ln for ln in r.stderr.splitlines() if ln.startswith("bupo: --trust-remote-code:")]
    assert len(notices) == 1 and str(folder) in notices[0], r.stderr
    assert marker.exists()  # the folder's code ran (the lens then refuses the unknown architecture: exit 2)
    assert r.returncode == 2 and "custom_qwen3" in r.stderr


def test_every_model_command_has_the_flag():
    from bupo.cli import build_parser
    from bupo.cli_common import subparsers_of

    commands = subparsers_of(build_parser())
    for name in ("lens", "sample", "analyze", "eval"):
        assert "--trust-remote-code" in commands[name]._option_string_actions, name
    from bupo.training.arguments import parse_train_args
    from bupo.training.model import model_init_kwargs

    args, script = parse_train_args(["--trust-remote-code"], cuda=False)
    assert model_init_kwargs(args, script.model_args)["trust_remote_code"] is True
    args, script = parse_train_args([], cuda=False)
    assert model_init_kwargs(args, script.model_args).get("trust_remote_code", False) is False


@pytest.mark.parametrize("yaml_text, where", [
    ("trust_remote_code: true\n", "the config may not set trust_remote_code"),
    ("model_init_kwargs:\n  trust_remote_code: true\n", "model_init_kwargs may not set trust_remote_code"),
])
def test_yaml_cannot_turn_remote_code_on(tmp_path, capsys, yaml_text, where):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    lines = _error_lines(capsys.readouterr().err, "train")
    assert len(lines) == 1 and where in lines[0] and "--trust-remote-code" in lines[0] and str(cfg) in lines[0]
    assert not (tmp_path / "run").exists()


def test_model_init_kwargs_flag_cannot_turn_remote_code_on():
    from bupo.training.arguments import parse_train_args
    from bupo.training.model import model_init_kwargs

    args, script = parse_train_args(["--model_init_kwargs", '{"trust_remote_code": true}'], cuda=False)
    with pytest.raises(ValueError, match="--model_init_kwargs may not set trust_remote_code"):
        model_init_kwargs(args, script.model_args)


@pytest.mark.parametrize("var", ["PYTHONWARNINGS", "PYTHONPATH", "LD_PRELOAD", "VLLM_LOGGING_CONFIG_PATH",
                                 "BUPO_", "SOME_OTHER_VARIABLE"])
def test_yaml_env_takes_an_allowlist(tmp_path, monkeypatch, var):
    from bupo.training.arguments import parse_train_args

    monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"env:\n  {var}: 'error::DeprecationWarning:evil'\n  HF_HUB_OFFLINE: '1'\n")
    with pytest.raises(ValueError, match=f"'env' may not set {var}; accepted: BUPO_\\*, NCCL_\\*, WANDB_\\*"):
        parse_train_args([], config=str(cfg), cuda=False)
    assert var not in os.environ


def test_yaml_env_allowlisted_variables_are_set(tmp_path, monkeypatch):
    from bupo.training.arguments import parse_train_args

    for var in ("BUPO_TEST_ALLOWED", "OMP_NUM_THREADS", "WANDB_MODE"):
        monkeypatch.setenv(var, "before")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("env:\n  BUPO_TEST_ALLOWED: 'yes'\n  OMP_NUM_THREADS: '1'\n  WANDB_MODE: offline\n")
    parse_train_args([], config=str(cfg), cuda=False)
    assert (os.environ["BUPO_TEST_ALLOWED"], os.environ["OMP_NUM_THREADS"], os.environ["WANDB_MODE"]) == (
        "yes", "1", "offline")


# ---------------------------------------------------------------------- corrupted checkpoints at the CLI: exit 2


def _corrupted(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how
    shutil.copytree(bundled_model_path(), folder)
    if how == "chat_template":
        (folder / "chat_template.jinja").write_text("{% if %}")
        return folder
    sd = dict(load_file(folder / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    if how == "nan":
        t = sd[name].clone()
        t[0, 0] = float("nan")
        sd[name] = t
    else:
        sd.pop(name)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("command, how, message", [
    ("lens", "nan", "hold NaN or inf"),
    ("eval", "missing", "1 tensor(s) of the model missing from the checkpoint"),
    ("lens", "chat_template", "the chat template is not valid Jinja"),
])
def test_corrupted_checkpoint_is_one_line_exit_2(tmp_path, command, how, message):
    folder = _corrupted(tmp_path, how)
    argv = ["--prompt", "1+1"] if command == "lens" else ["--problems", "2", "--n", "1", "--no-progress",
                                                          "--out", str(tmp_path / "out")]
    r = _bupo(command, "--model", str(folder), "--device", "cpu", *argv)
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr, command)
    assert len(lines) == 1 and message in lines[0], r.stderr
    if how != "chat_template":
        assert "'model.layers.2.mlp.down_proj.weight'" in lines[0]
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_the_env_allowlist_is_documented():
    from bupo.training.config_env import ENV_ALLOWED, ENV_ALLOWED_PREFIXES

    doc = (SRC.parent / "docs" / "training.md").read_text(encoding="utf-8")
    for name in (*ENV_ALLOWED, *ENV_ALLOWED_PREFIXES):
        assert f"`{name}`" in doc, name


def test_train_refuses_a_corrupted_checkpoint_before_any_work(tmp_path, capsys):
    folder = _corrupted(tmp_path, "nan")
    rc = main(["train", "--model", str(folder), "--out", str(tmp_path / "run"), "--internal-layer", "1",
               "--eval-data", "none", "--max_steps", "2", "--train-limit", "8"])
    assert rc == 2
    lines = _error_lines(capsys.readouterr().err, "train")
    assert len(lines) == 1 and "hold NaN or inf" in lines[0]
    assert not (tmp_path / "run").exists()
