"""TRL's ModelConfig flags and --model_init_kwargs through ``bupo train`` (CLI and YAML), and their bad
input: vLLM / peft / an attention implementation the machine lacks -> one line, exit 2."""

from __future__ import annotations

import pytest

from bupo.cli import main
from bupo.training.arguments import parse_train_args
from bupo.training.model import model_init_kwargs

pytestmark = [pytest.mark.xdist_group("training")]


def test_model_flags_are_parsed_from_the_cli_and_yaml(tmp_path):
    ta, sa = parse_train_args(["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
                               "--lora_target_modules", "q_proj", "k_proj", "--dtype", "bfloat16",
                               "--attn_implementation", "eager", "--model_name_or_path", "/m"], cuda=False)
    m = sa.model_args
    assert (m.use_peft, m.lora_r, m.lora_alpha, m.lora_target_modules) == (True, 8, 16, ["q_proj", "k_proj"])
    assert sa.model_name_or_path == "/m"
    assert model_init_kwargs(ta, m) == {"dtype": "bfloat16", "attn_implementation": "eager"}

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: /y\nuse_peft: true\nlora_r: 2\nlora_dropout: 0.0\n"
                   "model_init_kwargs: {attn_implementation: sdpa, dtype: float16}\n")
    ta, sa = parse_train_args([], config=str(cfg), overrides={"model_name_or_path": "/cli"}, cuda=False)
    assert sa.model_name_or_path == "/cli" and sa.model_args.lora_r == 2 and sa.model_args.lora_dropout == 0.0
    assert model_init_kwargs(ta, sa.model_args) == {"attn_implementation": "sdpa", "dtype": "float16"}
    # a JSON string from the CLI, as TRL documents it; the default dtype is fp32 (master weights)
    ta, sa = parse_train_args(["--model_init_kwargs", '{"attn_implementation": "eager"}'], cuda=False)
    assert model_init_kwargs(ta, sa.model_args) == {"attn_implementation": "eager", "dtype": "float32"}


def test_model_init_kwargs_reach_the_saved_model(tmp_path):
    import json

    from bupo.zoo import bundled_model_path

    out = tmp_path / "run"
    assert main(["train", "--model", str(bundled_model_path()), "--algo", "grpo", "--out", str(out),
                 "--eval-data", "none", "--max_steps", "1", "--steps_per_generation", "1",
                 "--per_device_train_batch_size", "8", "--num_generations", "8", "--max_completion_length", "8",
                 "--save_strategy", "no", "--probe_every", "0",
                 "--model_init_kwargs", '{"dtype": "bfloat16", "attn_implementation": "eager"}']) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert json.loads((out / "bupo_run.json").read_text())["weights_dtype"] == "bfloat16"


@pytest.mark.parametrize("argv, needle", [
    (["--use_vllm", "true"], "pip install 'bupo[vllm]'"),
    (["--use_vllm", "true", "--vllm_mode", "server"], "without a GPU use --vllm_mode colocate"),
    (["--use_vllm", "true", "--vllm_enable_sleep_mode", "true"], "sleep mode frees GPU memory"),
    (["--attn_implementation", "flash_attention_2"], "use --attn_implementation sdpa"),
    (["--model_init_kwargs", '{"attn_implementation": "flash_attention_2"}'], "use --attn_implementation sdpa"),
    (["--attn_implementation", "nope"], "accepted: eager"),
    (["--lora_r", "8"], "need --use_peft true"),
    (["--dtype", "bfloat16", "--model_init_kwargs", '{"dtype": "float16"}'], "given twice"),
    (["--data", "x.parquet", "--dataset_name", "y"], "not both"),
])
def test_bad_model_flags_are_one_line_exit_2(argv, needle, capsys):
    import importlib.util

    if "vllm" in needle and importlib.util.find_spec("vllm") is not None:
        pytest.fail("this check needs a machine without vLLM")
    if "flash_attention_2" in argv[-1] or "flash_attention_2" in argv[1]:
        from transformers.utils import is_flash_attn_2_available

        assert not is_flash_attn_2_available(), "this check needs a machine without flash-attn"
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_peft_flags_without_peft_are_one_line_exit_2(monkeypatch, capsys):
    import bupo.training.model as model

    real = model._installed
    monkeypatch.setattr(model, "_installed", lambda m: False if m == "peft" else real(m))
    assert main(["train", "--use_peft", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'bupo[peft]'" in err and len(err.splitlines()) == 1
