"""``bupo train``: arguments, config merging, model/data/reward assembly, in-process evaluation, run summary.

Argument precedence (lowest first): TRL/GRPOConfig defaults < the small-run defaults (only without ``--config``) <
CPU defaults (no CUDA: ``use_cpu``, fp32, no gradient checkpointing) < ``--config`` YAML < bupo's own flags
(``--model``, ``--internal-layer``, ...) < TRL-style flags given on the command line (``--learning_rate 1e-5``).

Layer ``k`` is 0-based (paper layer k+1); ``internal_steps``, ``probe_every`` and ``eval_every`` count rollout
steps (one generation batch each); TRL's ``max_steps`` / ``save_steps`` / ``logging_steps`` count optimizer steps.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "bupo_run.json"
ALGOS = ("bupo", "grpo")


@dataclass
class BuPOScriptArguments:
    """What ``bupo train`` needs besides the trainer config (also accepted as keys of the ``--config`` YAML)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "model folder (default: the bundled model)"})
    data: str | None = field(default=None, metadata={
        "help": "training rows: .parquet / .jsonl / .json (paper shape), or 'bundled' (default: the bundled task)"})
    eval_data: list[str] | None = field(default=None, metadata={
        "help": "held-out files evaluated in-process (Avg@K / Pass@K); 'bundled' = the bundled task's test split; "
        "'none' disables (default: bundled when training on the bundled task)"})
    algo: str = field(default="bupo", metadata={"help": "bupo (internal phase, then GRPO) or grpo (internal_steps=0)"})
    template: str = field(default="auto", metadata={
        "help": "prompt template: auto, qwen3_no_thinking, chat, octothinker (auto: qwen3_no_thinking when the "
        "tokenizer's chat template honours enable_thinking, else chat, else octothinker)"})
    reward: str = field(default="boxed_exact", metadata={"help": "comma-separated: boxed_exact (paper), math_verify"})
    reward_timeout: float = field(default=5.0, metadata={"help": "seconds per completion for each reward call"})
    train_rows: int | None = field(default=None, metadata={
        "help": "use at most this many training rows (bundled task: how many to generate, default 2048)"})
    max_prompt_length: int | None = field(default=1024, metadata={
        "help": "drop prompts longer than this many tokens (verl filter_overlong_prompts); TRL 1.16 does not truncate"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many rollout steps (0: before and after "
                                                          "training only)"})
    eval_samples: int = field(default=4, metadata={"help": "samples per problem for Avg@K / Pass@K during training"})
    eval_rows: int | None = field(default=None, metadata={"help": "at most this many problems per eval file"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "default: max_completion_length"})
    eval_batch_size: int = field(default=64, metadata={"help": "sequences per generation batch in evaluation"})
    eval_before_train: bool = field(default=True, metadata={"help": "evaluate the initial model (step 0)"})
    analysis: str | None = field(default=None, metadata={
        "help": "analysis (summary.json or its folder) for --internal-layer auto; default: <model>/analysis, "
        "<out>/analysis, else a short analysis is run into <out>/analysis"})
    auto_layer_samples: int = field(default=64, metadata={"help": "responses analysed when auto runs an analysis"})
    resume: str | None = field(default=None, metadata={
        "help": "checkpoint folder to resume from, or 'latest' (the newest checkpoint-* in the output folder)"})


# A run that finishes in a few minutes on 2 CPU cores with the bundled model and task.
SMALL_RUN_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/bupo-bundled",
    "internal_layer": "auto",
    "internal_steps": 4,  # of 20 rollout steps (the paper: 30 of 300; longer internal phases hurt, v3 Table 2)
    "max_steps": 40,  # 20 rollout steps of 2 optimizer steps
    "per_device_train_batch_size": 32,
    "steps_per_generation": 2,  # 64 completions (8 prompts x 8) per rollout step
    "num_generations": 8,
    "max_completion_length": 64,
    "learning_rate": 2e-4,  # the bundled model's GRPO proof (bupo model grpo-proof)
    "lr_scheduler_type": "constant",
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "beta": 0.0,
    "epsilon": 0.2,
    "loss_type": "dapo",
    "temperature": 1.0,
    "logging_steps": 2,
    "save_strategy": "steps",
    "save_steps": 20,
    "save_total_limit": 2,
    "probe_every": 2,
    "seed": 0,
    "report_to": "none",
    "disable_tqdm": True,
    "eval_every": 0,
    "eval_samples": 4,
    "eval_rows": 100,
}
CPU_DEFAULTS: dict[str, Any] = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
# bupo's own flags -> config keys
FLAG_KEYS = {
    "model": "model_name_or_path", "data": "data", "eval_data": "eval_data", "algo": "algo",
    "internal_layer": "internal_layer", "internal_steps": "internal_steps", "out": "output_dir",
    "template": "template", "reward": "reward", "analysis": "analysis", "resume": "resume",
    "internal_steps_max": "internal_steps_max", "internal_schedule": "internal_schedule",  # issue 16
}


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML ({exc})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a config must be a YAML mapping of argument names to values")
    env = cfg.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ValueError(f"{p}: 'env' must be a mapping of environment variables")
    for k, v in env.items():
        os.environ[str(k)] = str(v)
    return cfg


def parse_train_args(
    trl_args: list[str] | None = None,
    *,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    cuda: bool | None = None,
) -> tuple[Any, BuPOScriptArguments]:
    """``(BuPOConfig, BuPOScriptArguments)`` from the layered sources (see the module docstring)."""
    from trl import TrlParser

    from bupo.training.config import BuPOConfig

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    parser = TrlParser((BuPOConfig, BuPOScriptArguments), allow_abbrev=False)  # no silent prefix matches
    merged: dict[str, Any] = {}
    if config is None:
        merged.update(SMALL_RUN_DEFAULTS)
    if not cuda:
        merged.update(CPU_DEFAULTS)
    if config is not None:
        merged.update(_read_yaml(config))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = parser.set_defaults_with_config(**merged)
    if unknown:
        keys = sorted({s[2:] for s in unknown[::2]})
        raise ValueError(f"unknown configuration key(s) {keys}: not a BuPOConfig/GRPOConfig field nor a bupo train "
                         "argument (see bupo train --help and TRL's GRPOConfig)")
    try:
        train_args, script_args, rest = parser.parse_args_into_dataclasses(
            args=list(trl_args or []), return_remaining_strings=True)
    except SystemExit as exc:  # argparse already printed why
        raise ValueError(f"could not parse the TRL arguments {trl_args!r}") from exc
    if rest:
        raise ValueError(f"unrecognised arguments {rest}; TRL arguments use underscores (--learning_rate 1e-5)")
    if script_args.algo not in ALGOS:
        raise ValueError(f"--algo must be one of {', '.join(ALGOS)}, got {script_args.algo!r}")
    return train_args, script_args


# ---------------------------------------------------------------------------------------------------------------
# the internal layer


def find_analysis(model_path: str | None, output_dir: str | None) -> Path | None:
    """An existing analysis for --internal-layer auto: <model>/analysis or <out>/analysis (with summary.json)."""
    for base in (model_path, output_dir):
        if base and (Path(base) / "analysis" / "summary.json").is_file():
            return Path(base) / "analysis"
    return None


def resolve_internal_layer(
    value: int | str | None,
    *,
    model: Any,
    tokenizer: Any,
    model_path: str | None,
    output_dir: str,
    analysis: str | None,
    rows: list[dict],
    template: str,
    samples: int,
    max_new_tokens: int,
    is_main: bool = True,
    device: Any = None,
) -> tuple[int | None, str]:
    """``(k, source)``: an int is used as given; ``"auto"`` reads the analysis' suggested (boundary) layer,
    running a short analysis into ``<output_dir>/analysis`` when none exists.

    ``device``: where that short analysis runs (``bupo train`` passes the training device, so a model loaded on the
    CPU is moved to the accelerator first instead of generating on the CPU); None leaves the model where it is.
    """
    if value is None or isinstance(value, int):
        return value, "given"
    from bupo.analysis.run import suggested_layer

    if analysis:
        return suggested_layer(analysis), f"analysis {analysis}"
    found = find_analysis(model_path, output_dir)
    if found is not None:
        return suggested_layer(found), f"analysis {found}"
    # no analysis yet: run a short one (the paper: 0.44% of the training cost) and keep it next to the run
    from bupo.analysis.run import analyze

    out = Path(output_dir) / "analysis"
    if is_main:
        logger.info("--internal-layer auto: no analysis found, analysing %d responses into %s", samples, out)
        if device is not None:
            model.to(device)  # the trainer would move it there anyway
        # analyze runs in eval mode and restores every module's training flag itself
        analyze(model, tokenizer, data=rows[:samples], out_dir=out, max_samples=samples,
                max_new_tokens=max_new_tokens, template=template, figures=False)
    _barrier()
    return suggested_layer(out), f"analysis {out} (run by bupo train, {samples} responses)"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# evaluation during training


def _eval_sets(specs: list[str] | None, train_spec: str | None, rows_limit: int | None) -> dict[str, list[dict]]:
    """The in-training eval sets: :func:`bupo.data.datasets.load_benchmarks` (the same names, rows and seed as
    ``bupo eval``); default the bundled test split when training on the bundled task; ``["none"]`` disables."""
    from bupo.data.datasets import BUNDLED, load_benchmarks

    if specs is None:
        specs = [BUNDLED] if (train_spec in (None, BUNDLED)) else []
    if not specs or [s.lower() for s in specs] == ["none"]:
        return {}
    return load_benchmarks(specs, rows_limit)


def make_eval_callback(trainer: Any, sets: dict[str, list[dict]], script: BuPOScriptArguments, template: str,
                       out_dir: Path, records: list[dict]) -> Any:
    """A TrainerCallback running :func:`bupo.evaluation.evaluate` every ``eval_every`` rollout steps and at the end."""
    from transformers import Trainer, TrainerCallback

    args = trainer.args
    every = script.eval_every * args.optimizer_steps_per_rollout

    def run_eval(step: int) -> None:
        from trl.models import unwrap_model_for_generation

        from bupo.evaluation import evaluate

        t0 = time.time()
        main = trainer.accelerator.is_main_process
        # every rank evaluates the same seeded samples (sharded backends need all ranks in the forward); main writes.
        # Generation (bupo.generation) runs in eval mode under inference_mode and restores the training flags.
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as m:
            res = evaluate(m, trainer.processing_class, sets, n=script.eval_samples,
                           max_new_tokens=script.eval_max_new_tokens or args.max_completion_length,
                           temperature=args.temperature, top_p=args.top_p, template=template,
                           reward=script.reward.split(",")[0], seed=args.seed,
                           batch_size=script.eval_batch_size, label=f"step {step}",
                           out_dir=(out_dir / "evals" / f"step-{step:06d}") if main else None)
        metrics = res.metrics("eval")
        metrics["eval/seconds"] = time.time() - t0
        records.append({"step": step, "rollout_step": step // args.optimizer_steps_per_rollout, **metrics})
        Trainer.log(trainer, dict(metrics))  # bypass GRPOTrainer.log: it would flush the train metric window

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            if script.eval_before_train and state.global_step == 0:
                run_eval(0)

        def on_step_end(self, a, state, control, **kw):
            if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                run_eval(state.global_step)

        def on_train_end(self, a, state, control, **kw):
            if not records or records[-1]["step"] != state.global_step:
                run_eval(state.global_step)

    return EvalCallback()


# ---------------------------------------------------------------------------------------------------------------
# the run


def _resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise ValueError(f"--resume: no checkpoint-* folder in {output_dir}")
        return last
    if not Path(resume).is_dir():
        raise ValueError(f"--resume: {resume} is not a checkpoint folder")
    return resume


def train(train_args: Any, script: BuPOScriptArguments) -> dict[str, Any]:
    """Assemble and run one training; returns the run summary (also written to ``<output_dir>/bupo_run.json``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.evaluation import resolve_template
    from bupo.io import atomic_write_json
    from bupo.rewards import make_reward_func
    from bupo.training.data import BUNDLED, build_prompt_dataset, load_training_rows
    from bupo.training.trainer import BuPOTrainer

    out_dir = Path(train_args.output_dir)
    resume = _resolve_resume(script.resume, str(out_dir))
    model_path = script.model_name_or_path
    if model_path is None:
        from bupo.zoo import bundled_model_path

        model_path = str(bundled_model_path())
    if script.algo == "grpo":
        train_args.internal_steps = 0
    elif train_args.internal_steps <= 0:
        raise ValueError("--algo bupo needs --internal-steps S > 0 (rollout steps on the internal policy); "
                         "use --algo grpo for plain GRPO")

    dtype = torch.bfloat16 if train_args.bf16 else (torch.float16 if train_args.fp16 else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left", truncation_side="left")
    template = resolve_template(tokenizer, script.template)

    n_rows = script.train_rows or 2048
    rows = load_training_rows(script.data, split="train", n=n_rows, seed=train_args.seed)
    dataset = build_prompt_dataset(rows, tokenizer, template, max_prompt_length=script.max_prompt_length,
                                   limit=script.train_rows)
    eval_sets = _eval_sets(script.eval_data, script.data or BUNDLED, script.eval_rows)

    layer_value = train_args.internal_layer
    if script.algo == "grpo" and layer_value == "auto":
        layer_value = None  # GRPO needs no layer; an explicit k is kept for logging pi^k's entropy
    k, layer_source = resolve_internal_layer(
        layer_value, model=model, tokenizer=tokenizer, model_path=model_path, output_dir=str(out_dir),
        analysis=script.analysis, rows=rows, template=template, samples=script.auto_layer_samples,
        max_new_tokens=train_args.max_completion_length,
        is_main=int(os.environ.get("RANK", "0")) == 0, device=train_args.device)
    train_args.internal_layer = k

    reward_funcs = [make_reward_func(name.strip(), timeout=script.reward_timeout)
                    for name in script.reward.split(",") if name.strip()]
    if not reward_funcs:
        raise ValueError("--reward needs at least one reward name (boxed_exact, math_verify)")
    trainer = BuPOTrainer(model=model, reward_funcs=reward_funcs, args=train_args, train_dataset=dataset,
                          processing_class=tokenizer)
    records: list[dict] = []
    if eval_sets:
        trainer.add_callback(make_eval_callback(trainer, eval_sets, script, template, out_dir, records))

    n_per = train_args.optimizer_steps_per_rollout
    summary: dict[str, Any] = {
        "algo": script.algo,
        "model": model_path,
        "data": script.data or BUNDLED,
        "template": template,
        "reward": script.reward,
        "internal_layer": k,
        "internal_layer_paper": None if k is None else k + 1,
        "internal_layer_source": layer_source,
        "internal_steps": train_args.internal_steps,
        "internal_projection": train_args.internal_projection,
        "optimizer_steps_per_rollout": n_per,
        "full_phase_starts_at_optimizer_step": train_args.internal_steps * n_per + 1,
        "max_steps": train_args.max_steps,
        "train_rows": len(dataset),
        "conventions": "internal_layer is 0-based k (paper layer k+1); internal_steps counts rollout steps (one "
                       "generation batch = optimizer_steps_per_rollout optimizer steps); entropies in nats",
    }
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out_dir))  # the tokenizer too (Trainer._save saves processing_class)
    if trainer.accelerator.is_main_process:
        summary.update({
            "seconds": time.time() - t0,
            "resumed_from": resume,
            "global_step": trainer.state.global_step,
            "train_metrics": result.metrics,
            "evals": records,
            "switch": trainer.bupo_switch,  # issue 16: switch.step (first full-policy rollout step), switch.reason
            "versions": _versions(),
        })
        if summary["switch"].get("step"):  # issue 16: with auto / a schedule the full phase starts where it switched
            summary["full_phase_starts_at_optimizer_step"] = (summary["switch"]["step"] - 1) * n_per + 1
        atomic_write_json(out_dir / RUN_FILE, summary, default=str)
        atomic_write_json(out_dir / "log_history.json", trainer.state.log_history, default=str)
    return summary


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    from bupo import __version__

    return {"bupo": __version__, "trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def run_cli(args: Any) -> int:
    """Handler of ``bupo train`` (see :mod:`bupo.training.cli`)."""
    overrides = {key: getattr(args, flag, None) for flag, key in FLAG_KEYS.items()}
    train_args, script = parse_train_args(args.trl_args, config=args.config, overrides=overrides)
    summary = train(train_args, script)
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
