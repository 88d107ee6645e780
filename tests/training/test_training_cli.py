"""``bupo train`` end to end on a tiny saved model and JSONL rows; presets; config layering; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from bupo.cli import main
from bupo.training.arguments import parse_train_args
from support.training import TINY, char_tokenizer, make_model, toy_rows

pytestmark = pytest.mark.xdist_group("training")
PRESETS = ["qwen3-4b", "qwen3-8b", "octothinker-3b", "octothinker-8b"]
PAPER = {"qwen3-4b": (5, 30, 8192), "qwen3-8b": (5, 20, 8192), "octothinker-3b": (26, 20, 3072),
         "octothinker-8b": (30, 20, 3072)}
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_model().save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    for name, rows in (("train.jsonl", toy_rows(16)), ("test.jsonl", toy_rows(4, 100))):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _train(ws, out, *extra):
    return main(["train", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"),
                 "--eval-data", str(ws / "test.jsonl"), "--out", str(out), *TINY, *extra])


def test_train_evaluates_checkpoints_and_resumes_with_the_right_phase(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    # bundled defaults: 2 optimizer steps per rollout step, so rollout step 1 = optimizer steps 1-2 (internal)
    assert _train(workspace, out, "--internal-layer", "1", "--internal-steps", "2", "--max_steps", "2",
                  "--save_steps", "2") == 0
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["internal_layer"] == 1 and summary["internal_layer_paper"] == 2
    assert summary["optimizer_steps_per_rollout"] == 2 and summary["full_phase_starts_at_optimizer_step"] == 5
    assert summary["template"] == "chat" and summary["train_rows"] == 16
    assert [e["step"] for e in summary["evals"]] == [0, 2]
    assert "eval/test/avg@2" in summary["evals"][0] and "eval/test/pass@1" in summary["evals"][0]
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").exists()
    assert (out / "evals" / "step-000002" / "results.json").exists()
    history = json.loads((out / "log_history.json").read_text())
    assert [h["bupo/phase"] for h in history if "bupo/phase" in h] == [1.0]
    assert "eval/avg" in capsys.readouterr().out

    # resume from the checkpoint inside the internal phase: rollout step 2 is still internal, 3 is full
    assert _train(workspace, out, "--internal-layer", "1", "--internal-steps", "2", "--max_steps", "6",
                  "--save_steps", "2", "--resume", "--eval-data", "none") == 0
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 6
    history = json.loads((out / "log_history.json").read_text())
    phases = {h["step"]: h["bupo/phase"] for h in history if "bupo/phase" in h}
    assert phases == {2: 1.0, 4: 1.0, 6: 0.0}
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out)
    assert final.config.num_hidden_layers == 4
    from transformers import AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(out)  # saved with the model (by the trainer's save_model)
    assert saved_tok("What is 2 + 2?")["input_ids"] == char_tokenizer()("What is 2 + 2?")["input_ids"]


def test_an_evaluation_leaves_the_steps_training_log_in_place(workspace, tmp_path):
    out = tmp_path / "run"
    # 2 optimizer steps per rollout step, logged every 2; an evaluation after every rollout step
    assert _train(workspace, out, "--internal-layer", "1", "--internal-steps", "1", "--max_steps", "4",
                  "--eval_every", "1", "--save_strategy", "no") == 0
    history = json.loads((out / "log_history.json").read_text())
    assert {h["step"]: h["bupo/phase"] for h in history if "bupo/phase" in h} == {2: 1.0, 4: 0.0}
    assert [h["step"] for h in history if "eval/avg" in h] == [0, 2, 4]


def test_a_resumed_run_lists_the_evaluations_before_its_checkpoint(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(workspace, out, "--internal-layer", "1", "--internal-steps", "1", "--max_steps", "2",
                  "--save_steps", "2") == 0
    first = json.loads((out / "bupo_run.json").read_text())["evals"]
    assert [e["step"] for e in first] == [0, 2]
    capsys.readouterr()
    assert _train(workspace, out, "--internal-layer", "1", "--internal-steps", "1", "--max_steps", "4",
                  "--save_steps", "2", "--resume") == 0
    evals = json.loads((out / "bupo_run.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[:2] == first  # the same records, rebuilt from the checkpoint's log history
    assert f"(step 0) -> {evals[-1]['eval/avg']:.4f} (step 4)" in capsys.readouterr().out


def test_earlier_evals_come_from_the_last_summary_and_the_log_history(tmp_path):
    from bupo.training.eval_callback import earlier_evals

    history = [{"eval/avg": 0.1, "eval/x/avg@2": 0.1, "step": 0}, {"loss": 1.0, "step": 2},
               {"eval/avg": 0.3, "step": 4}, {"eval/avg": 0.5, "step": 6}]
    # a run stopped before it wrote bupo_run.json: the log history up to the checkpoint's step
    assert earlier_evals(history, 2, tmp_path, upto=4) == [
        {"step": 0, "rollout_step": 0, "eval/avg": 0.1, "eval/x/avg@2": 0.1, "generation": None},
        {"step": 4, "rollout_step": 2, "eval/avg": 0.3, "generation": None}]
    # a finished run's summary holds the end-of-training eval too, which its last checkpoint's history lacks
    (tmp_path / "bupo_run.json").write_text(json.dumps({"evals": [{"step": 5, "eval/avg": 0.4, "generation": "hf"},
                                                                  {"step": 8, "eval/avg": 0.9}]}))
    assert [e["step"] for e in earlier_evals(history, 2, tmp_path, upto=6)] == [0, 4, 5, 6]


def test_grpo_baseline_and_auto_layer_from_an_analysis(workspace, tmp_path):
    out = tmp_path / "grpo"
    assert _train(workspace, out, "--algo", "grpo", "--max_steps", "2", "--eval-data", "none") == 0
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["algo"] == "grpo" and summary["internal_steps"] == 0 and summary["internal_layer"] is None
    history = json.loads((out / "log_history.json").read_text())
    assert {h["bupo/phase"] for h in history if "bupo/phase" in h} == {0.0}

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "summary.json").write_text(json.dumps({"num_layers": 4, "boundary_layer": 3,
                                                       "suggested_internal_layer": 2}))
    out = tmp_path / "auto"
    assert _train(workspace, out, "--internal-layer", "auto", "--analysis", str(analysis), "--max_steps", "2",
                  "--eval-data", "none") == 0
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["internal_layer"] == 2 and "analysis" in summary["internal_layer_source"]


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1"], "unrecognised arguments"),
    (["--internal-steps", "0"], "needs --internal-steps"),
    (["--data", "/nonexistent/rows.jsonl"], "not found"),
    (["--resume"], "no checkpoint"),
    (["--internal-layer", "seven"], "internal_layer"),
    (["--template", "nope"], "unknown template"),
])
def test_bad_input_is_one_clear_line(workspace, tmp_path, capsys, argv, message):
    rc = main(["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"),
               "--out", str(tmp_path / "bad"), "--internal-layer", "1", "--eval-data", "none", *TINY, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_unknown_yaml_key_is_rejected(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("internal_layer: 3\ninternal_steps: 2\nlearning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_train_args([], config=str(cfg), cuda=False)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse_into_bupo_config_with_the_papers_settings(preset):
    from bupo.training.config import BuPOConfig

    args, script = parse_train_args([], config=preset, cuda=False)
    k, s, length = PAPER[preset]
    assert isinstance(args, BuPOConfig)
    assert (args.internal_layer, args.internal_steps, args.max_completion_length) == (k, s, length)
    assert args.internal_projection == "raw" and script.algo == "bupo"
    assert args.learning_rate == 1e-6 and args.beta == 0.0 and args.epsilon == 0.2 and args.epsilon_high is None
    assert args.num_generations == 8 and args.generation_batch_size == 1024 and args.num_iterations == 1
    assert args.optimizer_steps_per_rollout == 4 and args.max_steps == 300 * 4
    assert args.delta == 10.0 and args.loss_type == "dapo" and args.temperature == 1.0 and args.top_p == 1.0 and args.top_k == 0
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0 and args.lr_scheduler_type == "constant"
    assert args.save_steps % 4 == 0 and script.reward == "boxed_exact" and script.max_prompt_length == 1024
    # 256 completions per optimizer step on one process
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 256
    # fp32 master weights, bf16 autocast (TRL's default); OctoThinker: the released code's chat template on [system, user]
    from bupo.training.model import model_init_kwargs

    assert model_init_kwargs(args, script.model_args)["dtype"] == "float32"
    assert script.template == ("chat" if preset.startswith("octothinker") else "qwen3_no_thinking")


def test_optimizer_batch_size_adapts_to_the_world_size(monkeypatch):
    from bupo.training.config import BuPOConfig

    monkeypatch.setattr(BuPOConfig, "world_size", property(lambda self: 8))
    args, _ = parse_train_args([], config="qwen3-4b", cuda=False)
    assert args.gradient_accumulation_steps == 4 and args.steps_per_generation == 16
    assert args.optimizer_steps_per_rollout == 4 and args.ddp_find_unused_parameters is True
    with pytest.raises(ValueError, match="optimizer_batch_size"):
        parse_train_args(["--per_device_train_batch_size", "64"], config="qwen3-4b", cuda=False)


def test_layering_flags_override_yaml_and_trl_flags_override_all(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("internal_layer: 3\ninternal_steps: 2\nlearning_rate: 1e-4\nnum_generations: 4\n"
                   "per_device_train_batch_size: 8\nenv:\n  BUPO_TEST_ENV: 'yes'\n")
    args, _ = parse_train_args(["--learning_rate", "2e-5"], config=str(cfg), overrides={"internal_layer": "1"},
                               cuda=False)
    assert args.internal_layer == 1 and args.internal_steps == 2 and args.learning_rate == 2e-5
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing  # CPU defaults
    import os

    assert os.environ.pop("BUPO_TEST_ENV") == "yes"
    assert torch.get_num_threads() >= 1


def test_auto_layer_analysis_runs_on_the_training_device(tmp_path, monkeypatch):
    """With no analysis, ``auto`` analyses the model on the device it will train on (the accelerator, not the CPU
    from_pretrained left it on). "meta" stands in for the accelerator: the fake analysis sees where the model is."""
    import bupo.analysis.run as analysis_run
    from bupo.training.layer import resolve_internal_layer

    seen = {}

    def fake_analyze(model, tokenizer, *, out_dir, **kw):
        seen["device"] = next(model.parameters()).device
        out_dir.mkdir(parents=True)
        (out_dir / "summary.json").write_text(json.dumps({"num_layers": 4, "suggested_internal_layer": 1}))

    monkeypatch.setattr(analysis_run, "analyze", fake_analyze)
    model = make_model()
    assert next(model.parameters()).device.type == "cpu"
    k, source = resolve_internal_layer("auto", model=model, tokenizer=None, model_path=None,
                                       output_dir=str(tmp_path), analysis=None, rows=toy_rows(4), template="chat",
                                       samples=4, max_new_tokens=4, device=torch.device("meta"))
    assert (k, seen["device"].type) == (1, "meta") and "run by bupo train" in source


def test_in_training_eval_sets_are_bupo_evals(workspace):
    """bupo train evaluates the same problems under the same names as bupo eval (one loader, one seed)."""
    import argparse

    from bupo.evaluation.cli import _datasets
    from bupo.training.eval_callback import eval_sets

    assert eval_sets(None, None, 5) == _datasets(argparse.Namespace(data=None, limit=5))
    assert list(eval_sets(None, None, 5)) == ["bundled_test"]
    test = str(workspace / "test.jsonl")
    assert eval_sets([test], str(workspace / "train.jsonl"), 3) == _datasets(argparse.Namespace(data=[test],
                                                                                                 limit=3))
    assert eval_sets(None, str(workspace / "train.jsonl"), 3) == {}
    assert eval_sets(["none"], None, 3) == {}
    with pytest.raises(ValueError, match="both map to the benchmark name"):
        eval_sets([test, test], None, None)


def test_auto_layer_analysis_leaves_the_model_training(tmp_path):
    """The short analysis that ``auto`` runs puts the model in eval mode only while it runs (bupo train hands it
    a model that then trains: dropout and friends must come back on)."""
    from bupo.training.layer import resolve_internal_layer

    model = make_model()
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately in eval mode stays so
    try:
        k, source = resolve_internal_layer("auto", model=model, tokenizer=char_tokenizer(), model_path=None,
                                           output_dir=str(tmp_path), analysis=None, rows=toy_rows(2), template="chat",
                                           samples=2, max_new_tokens=4, device=torch.device("cpu"))
        assert 0 <= k < 3 and "run by bupo train" in source  # k = L-1 (the full policy) is never a boundary
    except ValueError as exc:  # random weights may have no usable boundary: said so, after the analysis ran
        assert "no usable boundary" in str(exc)
    assert (tmp_path / "analysis" / "summary.json").is_file()
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


def test_in_training_eval_restores_the_training_mode_and_builds_no_graph(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.eval_callback import make_eval_callback
    from support.training import make_trainer

    tr = make_trainer(tmp_path, max_steps=1)
    tr.model.train()
    tr.model.model.layers[0].eval()  # a submodule deliberately in eval mode stays so
    seen = []
    orig = tr.model.generate

    def spy(*a, **kw):  # where generation runs: eval mode, no autograd
        seen.append((tr.model.training, torch.is_grad_enabled()))
        return orig(*a, **kw)

    monkeypatch.setattr(tr.model, "generate", spy)
    script = BuPOScriptArguments(eval_samples=2, eval_max_new_tokens=4, eval_batch_size=8)
    records: list[dict] = []
    cb = make_eval_callback(tr, {"toy": toy_rows(2)}, script, "chat", tmp_path, records)
    cb.on_train_begin(tr.args, TrainerState(), TrainerControl())
    assert [r["step"] for r in records] == [0] and "eval/toy/avg@2" in records[0]
    assert seen and all(s == (False, False) for s in seen)
    assert tr.model.training and tr.model.model.layers[1].training and not tr.model.model.layers[0].training


def test_python_api_trains_a_config_built_directly(workspace, tmp_path):
    """bupo.training.train takes a BuPOConfig built in Python (no parser); the config passed in is not changed: the
    run trains on a new one with the resolved layer."""
    from trl import ModelConfig

    from bupo.training import BuPOConfig, BuPOScriptArguments, train

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "summary.json").write_text(json.dumps({"num_layers": 4, "suggested_internal_layer": 2}))
    config = BuPOConfig(output_dir=str(tmp_path / "api"), internal_layer="auto", internal_steps=1, max_steps=2,
                        per_device_train_batch_size=8, steps_per_generation=2, num_generations=4,
                        max_completion_length=8, learning_rate=1e-2, probe_every=1, save_strategy="no",
                        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none")
    script = BuPOScriptArguments(data=str(workspace / "train.jsonl"), eval_data=["none"], analysis=str(analysis))
    summary = train(config, script, ModelConfig(model_name_or_path=str(workspace / "model")))
    assert (summary["internal_layer"], summary["internal_steps"], summary["global_step"]) == (2, 1, 2)
    assert json.loads((tmp_path / "api" / "bupo_run.json").read_text())["internal_layer_source"].startswith("analysis")
    assert config.internal_layer == "auto"
    with pytest.raises(ValueError, match="--algo grpo trains the full policy only"):  # internal_steps=1 was given
        train(config, BuPOScriptArguments(algo="grpo"))


def test_run_settings_build_what_the_parser_builds():
    from bupo.training import run_settings
    from bupo.training.validation import check_run

    values = {"output_dir": "unused", "internal_layer": 1, "internal_steps": 2, "learning_rate": 1e-3,
              "eval_rows": 5, "model_name_or_path": "/m", "lora_r": 4}
    direct, direct_script = run_settings(values, cuda=False)
    parsed, parsed_script = parse_train_args([], overrides=values, cuda=False)
    assert direct.to_dict() == parsed.to_dict() and direct_script == parsed_script
    assert direct_script.model_args == parsed_script.model_args and direct_script.model_name_or_path == "/m"
    # the small run's internal_steps is a default, which --algo grpo drops; one it was given, it refuses
    grpo, script = run_settings({"algo": "grpo"}, cuda=False)
    assert grpo.internal_steps == 4 and check_run(grpo, script) == {"internal_steps": 0, "internal_schedule": None}
    grpo, script = run_settings({"algo": "grpo", "internal_steps": 3}, cuda=False)
    with pytest.raises(ValueError, match="cannot take --internal-steps 3"):
        check_run(grpo, script)
    with pytest.raises(ValueError, match="unknown configuration key"):
        run_settings({"learning_rat": 1.0}, cuda=False)


def test_resolved_config_is_built_and_validated_from_the_given_values():
    """dataclasses.replace would pass back GRPOConfig's derived batch fields (refused as given together);
    resolved() rebuilds from the given values, and validates the final ones."""
    args, _ = parse_train_args([], config="qwen3-4b", cuda=False)
    new = args.resolved(internal_layer=3)
    assert (new.internal_layer, args.internal_layer) == (3, 5)
    assert (new.gradient_accumulation_steps, new.steps_per_generation) == (args.gradient_accumulation_steps,
                                                                           args.steps_per_generation) == (32, 128)
    with pytest.raises(ValueError, match="save_steps"):
        args.resolved(save_steps=3)
    grpo = args.resolved(internal_steps=0, save_steps=3)  # no internal phase: checkpoints may fall anywhere
    assert grpo.internal_steps == 0 and grpo.save_steps == 3
