"""``bupo train`` as one readable function: validate, load, resolve the layer, build the trainer, train, summarise.

The pieces live by concern: arguments and their layering (:mod:`~bupo.training.arguments`), validation
(:mod:`~bupo.training.validation`), the model and PEFT (:mod:`~bupo.training.model`), the training rows
(:mod:`~bupo.training.data`), the internal layer and its health check (:mod:`~bupo.training.layer`), the in-training
evaluation (:mod:`~bupo.training.eval_callback`) and resuming (:mod:`~bupo.training.resume`).

From Python, build the config directly and call :func:`train`::

    from trl import ModelConfig
    from bupo.training import BuPOConfig, BuPOScriptArguments, train

    config = BuPOConfig(output_dir="runs/x", internal_layer=3, internal_steps=4, max_steps=40)
    summary = train(config, BuPOScriptArguments(eval_data=["none"]), ModelConfig(model_name_or_path="tiny"))

(docs/training.md, "From Python", has a runnable example.)

(:func:`~bupo.training.arguments.run_settings` gives the same objects with ``bupo train``'s small-run defaults.)

Layer ``k`` is 0-based (paper layer k+1); ``internal_steps``, ``probe_every`` and ``eval_every`` count rollout
steps (one generation batch each); TRL's ``max_steps`` / ``save_steps`` / ``logging_steps`` count optimizer steps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bupo.provenance import versions
from bupo.training.arguments import FLAG_KEYS, BuPOScriptArguments, parse_train_args
from bupo.training.data import BUNDLED, TrainingData, training_data
from bupo.training.eval_callback import check_eval_context, eval_sets, make_eval_callback
from bupo.training.layer import check_internal_policy, check_layers, config_num_layers, resolve_internal_layer
from bupo.training.model import (
    check_model_flags,
    default_model_args,
    load_tokenizer,
    peft_config,
    policy_model,
)
from bupo.training.resume import (
    RUN_FILE,
    check_resume_matches,
    claim_output,
    data_fingerprint,
    resolve_resume,
    train_or_finish,
)
from bupo.training.validation import check_environment, check_run

if TYPE_CHECKING:
    from bupo.training.config import BuPOConfig

__all__ = ["RUN_FILE", "parse_train_args", "run_cli", "train"]


def train(config: BuPOConfig, script: BuPOScriptArguments | None = None, model_args: Any = None) -> dict[str, Any]:
    """Assemble and run one training; returns the run summary (also written to ``<output_dir>/bupo_run.json``).

    ``config``: a :class:`~bupo.training.config.BuPOConfig`, built directly or by :func:`parse_train_args`;
    ``internal_layer`` may be ``"auto"``. ``script``: the bupo train keys (default ``BuPOScriptArguments()``).
    ``model_args``: TRL's ``ModelConfig`` (the model, dtype, PEFT; default ``script.model_args``, else the bundled
    model). ``config`` is never changed: the run trains on one new config that holds the resolved layer and the
    internal steps the algorithm fixes, validated like any other (``BuPOConfig.resolved``).
    """
    from bupo.models import resolve_model

    script = script if script is not None else BuPOScriptArguments()
    model_args = model_args or script.model_args or default_model_args()
    fixed = check_run(config, script, model_args)  # the settings, once, before anything is loaded or written
    check_model_flags(config, model_args)  # what this machine cannot honour: vLLM, peft, attention kernels
    check_environment(config)
    from bupo.training.launcher import enable_cpu_fsdp2

    enable_cpu_fsdp2()  # an FSDP2 launcher on CPU processes: real FSDP2 over gloo, not DDP (docs/training.md)
    out_dir = Path(config.output_dir)
    if script.resume is not None and script.resume != "latest":
        resolve_resume(script.resume, str(out_dir))  # a bad checkpoint folder: one line before the model resolves
    model_path = resolve_model(model_args.model_name_or_path or script.model_name_or_path)  # one-line errors
    check_layers(config, config_num_layers(model_path))  # --internal-layer / --internal-schedule in 0..L-1, now
    # held until the run ends: one writer, no finished run or newer checkpoint replaced without --overwrite
    with claim_output(out_dir, script.resume, script.overwrite, model_path) as resume:
        return _train(config, script, model_args, model_path, resume, fixed)


def _train(config: BuPOConfig, script: BuPOScriptArguments, model_args: Any, model_path: str, resume: str | None,
           fixed: dict[str, Any]) -> dict[str, Any]:
    """:func:`train` once its inputs are checked and its output folder is held."""
    from bupo.data.templates import record_template
    from bupo.evaluation import resolve_template
    from bupo.generation import context_length
    from bupo.training.console import install_console
    from bupo.training.launcher import complete_fused_lm_head
    from bupo.training.trainer import BuPOTrainer

    out_dir = Path(config.output_dir)
    # fp32 master weights unless a low-precision dtype is asked for; bf16/fp16 are autocast (TRL's default)
    model = policy_model(model_path, config, model_args)
    tokenizer = load_tokenizer(model_path, config, model_args)
    template = resolve_template(tokenizer, script.template)
    record_template(tokenizer, template)  # saved with the tokenizer: bupo eval/analyze --template auto reuse it
    context = context_length(model)
    data = training_data(script, tokenizer, template, config, context)
    evals = eval_sets(script.eval_data, data.spec, script.eval_rows)
    check_eval_context(evals, tokenizer, template, script, config, context)

    layer = config.internal_layer
    if script.algo == "grpo" and layer == "auto":
        layer = None  # GRPO needs no layer; an explicit k is kept for logging pi^k's entropy
    k, layer_source = resolve_internal_layer(
        layer, model=model, tokenizer=tokenizer, model_path=model_path, output_dir=str(out_dir),
        analysis=script.analysis, rows=data.rows, template=template, samples=script.auto_layer_samples,
        max_new_tokens=config.max_completion_length, is_main=int(os.environ.get("RANK", "0")) == 0,
        device=config.device, projection=config.internal_projection)
    # the run's config, resolved once; model_init_kwargs were consumed by policy_model (TRL would warn it ignores them)
    config = config.resolved(internal_layer=k, model_init_kwargs=None, **fixed)
    policy_check = None
    if script.algo == "bupo" and k is not None:  # named with its numbers before the first rollout, not after
        policy_check = check_internal_policy(model, tokenizer, data.rows, template, k, config.internal_projection)

    from bupo.engines import trl_colocate_defaults

    with trl_colocate_defaults(config, model):  # vLLM colocate: bupo's engine settings for this machine
        trainer = BuPOTrainer(model=model, reward_funcs=_reward_funcs(script), args=config,
                              train_dataset=data.dataset, processing_class=tokenizer,
                              peft_config=peft_config(model_args))
    _check_launcher(trainer)
    complete_fused_lm_head(trainer)  # FSDP2: TRL's fused head reads lm_head.weight; let lm_head's unit complete
    install_console(trainer, verbose=script.verbose)  # bar + switch/end lines; raw TRL dicts only with --verbose
    trainer.bupo_run_extra = {
        "model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "data": str(Path(data.spec).resolve()) if data.spec != BUNDLED and Path(data.spec).exists() else data.spec,
        "data_fingerprint": data_fingerprint(data.dataset),
    }
    if resume is not None:
        check_resume_matches(resume, {**trainer.bupo_run_identity(), **trainer.bupo_run_extra}, script.force_resume)
    records: list[dict] = []
    if evals:
        trainer.add_callback(make_eval_callback(trainer, evals, script, template, out_dir, records))

    summary = _summary(config, script, model_args, model, model_path, template, data, layer_source, policy_check)
    from bupo.training.arms import arm_of

    summary.update(arm=arm_of(config), internal_objective=config.internal_objective,  # the control arms
                   train_layer=trainer.bupo_run_identity()["train_layer"], random_reward=config.random_reward)
    trainer.bupo_run = summary  # the model card (bupo.training.card) reads template, data and k's source here
    t0 = time.time()
    result = train_or_finish(trainer, resume)
    trainer.save_model(str(out_dir))  # the tokenizer too (Trainer._save saves processing_class)
    summary["global_step"] = trainer.state.global_step
    if trainer.accelerator.is_main_process:
        _write_results(trainer, summary, result, records, resume, time.time() - t0, out_dir)
    return summary


def _reward_funcs(script: BuPOScriptArguments) -> list[Any]:
    from bupo.rewards import make_reward_func, parse_rewards

    return [make_reward_func(name, timeout=script.reward_timeout, workers=script.reward_workers)
            for name in parse_rewards(script.reward)]


def _summary(config: BuPOConfig, script: BuPOScriptArguments, model_args: Any, model: Any, model_path: str, template: str,
             data: TrainingData, layer_source: str, policy_check: dict[str, Any] | None) -> dict[str, Any]:
    """What ``bupo_run.json`` says about the run before it trains (conventions included)."""
    k, n_per = config.internal_layer, config.optimizer_steps_per_rollout
    return {
        "algo": script.algo,
        "model": model_path,
        "data": data.spec,
        "template": template,
        "weights_dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch."),
        "mixed_precision": "bf16" if config.bf16 else ("fp16" if config.fp16 else "no"),
        "peft": "lora" if model_args.use_peft else None,
        "prompt_length_limit": data.prompt_limit,
        "prompt_length_limit_reason": data.limit_reason,
        "prompts_dropped": data.dropped,
        "reward": script.reward,
        "temperature": config.temperature,  # rollouts and in-training evaluations sample at it
        "max_completion_length": config.max_completion_length,
        "internal_layer": k,
        "internal_layer_paper": None if k is None else k + 1,
        "internal_layer_source": layer_source,
        "internal_steps": config.internal_steps,
        "internal_projection": config.internal_projection,
        "internal_policy_check": policy_check,
        "optimizer_steps_per_rollout": n_per,
        "full_phase_starts_at_optimizer_step": config.internal_steps * n_per + 1,
        "max_steps": config.max_steps,
        "train_rows": len(data.dataset),
        "conventions": "internal_layer is 0-based k (paper layer k+1); internal_steps counts rollout steps (one "
                       "generation batch = optimizer_steps_per_rollout optimizer steps); entropies in nats",
    }


def _write_results(trainer: Any, summary: dict[str, Any], result: Any, records: list[dict], resume: str | None,
                   seconds: float, out_dir: Path) -> None:
    """The main process completes the summary and writes bupo_run.json, log_history.json and the model card."""
    from bupo.engines import training_engine
    from bupo.io import atomic_write_json
    from bupo.training.launcher import sharding_summary

    summary.update({
        "seconds": seconds,
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_metrics": result.metrics,
        "evals": records,
        "switch": trainer.bupo_switch,  # switch.step (the first full-policy rollout step), switch.reason
        "sharding": sharding_summary(trainer),  # launcher, world size, FSDP2 units / ZeRO stage
        "generation": training_engine(trainer.args, trainer.model),  # rollouts: HF generate or vLLM (mode, version)
        "versions": versions(("bupo", "trl", "transformers", "torch")),
    })
    if summary["switch"].get("step"):  # with auto / a schedule the full phase starts where it switched
        summary["full_phase_starts_at_optimizer_step"] = ((summary["switch"]["step"] - 1)
                                                          * summary["optimizer_steps_per_rollout"] + 1)
    atomic_write_json(out_dir / RUN_FILE, summary, default=str)
    atomic_write_json(out_dir / "log_history.json", trainer.state.log_history, default=str)
    trainer.create_model_card(model_name=out_dir.name)  # README.md with the final evaluation


def _check_launcher(trainer: Any) -> None:
    """A launcher config asking for FSDP or DeepSpeed that the trainer did not get is an error, not a silent DDP run
    (accelerate turns FSDP on only for GPU-like devices: on the CPU, FSDP1 would become DDP; FSDP2 is kept on by
    :func:`bupo.training.launcher.enable_cpu_fsdp2`)."""
    for env, enabled, name in (("ACCELERATE_USE_FSDP", trainer.is_fsdp_enabled, "FSDP"),
                               ("ACCELERATE_USE_DEEPSPEED", trainer.is_deepspeed_enabled, "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true" and not enabled:
            raise ValueError(f"the accelerate config asks for {name}, but accelerate did not enable it on this "
                             f"machine ({trainer.accelerator.distributed_type}; {name} needs GPUs); use "
                             "the cpu accelerate config (bupo recipes path cpu) for CPU processes"
                             + (", or FSDP2 (bupo recipes path fsdp2-cpu)" if name == "FSDP" else ""))


def run_cli(args: Any) -> int:
    """Handler of ``bupo train`` (see :mod:`bupo.training.cli`)."""
    overrides = {key: getattr(args, flag, None) for flag, key in FLAG_KEYS.items()}
    train_args, script = parse_train_args(args.trl_args, config=args.config, overrides=overrides)
    summary = train(train_args, script)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher the run's lines come once, from rank 0
        return 0
    if summary.get("evals"):
        first, last = summary["evals"][0], summary["evals"][-1]
        print(f"eval/avg: {first['eval/avg']:.4f} (step {first['step']}) -> {last['eval/avg']:.4f} "
              f"(step {last['step']})")
    switch = summary.get("switch") or {}
    if switch.get("mode") in ("auto", "schedule"):
        print(f"switch ({switch['mode']}): full policy from rollout step {switch.get('step')}: {switch.get('reason')}")
        internal = f"{switch.get('step') - 1 if switch.get('step') else 'all'} internal rollout steps"
    else:
        internal = f"internal rollout steps 1..{summary['internal_steps']}"
    print(f"{summary['algo']}: k={summary['internal_layer']} ({summary['internal_layer_source']}), "
          f"{internal}, {summary.get('global_step')} optimizer steps; outputs in {train_args.output_dir}")
    return 0
