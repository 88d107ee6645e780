"""The run's settings checked once, before anything is loaded: one ValueError line each, saying what was wrong and
what is accepted. :func:`algo_settings` is the one home of the algo / internal-steps rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from bupo.rewards.api import parse_rewards
from bupo.training.arguments import ALGOS, BuPOScriptArguments

#: the numeric fields that may go below 0, with their least value (every other number of the config is >= 0):
#: max_steps -1 = num_train_epochs, local_rank -1 = no launcher, top_k -1 = off (vLLM's spelling)
LEAST_VALUE = {"max_steps": -1, "local_rank": -1, "top_k": -1}
#: the numeric fields whose values may have either sign (a reward weight of -1 subtracts that reward)
SIGNED = frozenset({"reward_weights"})
#: AdamW moves each weight by about the learning rate per step: above this, every step overwrites the model
MAX_LEARNING_RATE = 1.0
#: the settings that ask for float16 arithmetic, which the CPU cannot train in (AdamW steps overflow to NaN)
_FP16 = ("float16", "fp16", "half", "torch.float16")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """``(where, number)`` for every int/float in ``value`` (lists and dicts walked; bools are not numbers)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path, value
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")


def check_numbers(*configs: Any) -> None:
    """Every number of every field of ``configs`` (dataclasses: BuPOConfig, BuPOScriptArguments, ModelConfig) is
    finite, and >= 0 unless the field may be negative (:data:`LEAST_VALUE`, :data:`SIGNED`): the one place where
    impossible values are refused, whichever flag, YAML key or Python field they came from."""
    for config in configs:
        if config is None:
            continue
        for f in dataclasses.fields(config):
            for where, x in _numbers(getattr(config, f.name, None), f.name):
                if not math.isfinite(x):
                    raise ValueError(f"{where} must be a finite number, got {x!r}")
                least = LEAST_VALUE.get(f.name, 0)
                if f.name not in SIGNED and x < least:
                    raise ValueError(f"{where} must be >= {least}, got {x!r}")


def check_precision(train_args: Any, model_args: Any) -> None:
    """float16 on the CPU is refused (weights or autocast): CPU training in fp16 overflows to NaN weights, and
    ``fp16`` autocast does not run on the CPU at all. bf16 or fp32 are the CPU's options."""
    from bupo.training.model import model_init_kwargs

    if train_args.device.type != "cpu":
        return
    dtype = model_init_kwargs(train_args, model_args)["dtype"]  # the one resolution of --dtype/--model_init_kwargs
    if str(dtype) in _FP16:
        raise ValueError("dtype float16 cannot train on the CPU (the weights overflow to NaN); use --dtype float32 "
                         "(default) or bfloat16")
    if train_args.fp16:
        raise ValueError("fp16 mixed precision needs a GPU; on the CPU use --bf16 true or neither (fp32)")


def algo_settings(algo: str, internal_steps: int, *, steps_given: bool = True) -> dict[str, Any]:
    """The BuPOConfig values ``algo`` fixes: ``grpo`` trains the full policy only (``internal_steps = 0``; an
    ``internal_steps > 0`` the user gave is an error, a default one is dropped); ``bupo`` needs ``internal_steps > 0``.
    """
    if algo not in ALGOS:
        raise ValueError(f"--algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if algo == "grpo":
        if steps_given and internal_steps > 0:
            raise ValueError(f"--algo grpo trains the full policy only; it cannot take --internal-steps "
                             f"{internal_steps} (use --algo bupo, or drop --internal-steps)")
        return {"internal_steps": 0, "internal_schedule": None}
    if internal_steps <= 0:
        raise ValueError("--algo bupo needs --internal-steps S > 0 (rollout steps on the internal policy); "
                         "use --algo grpo for plain GRPO")
    return {}


def validate_run_args(train_args: Any, script: BuPOScriptArguments) -> None:
    """ValueError (one line) for settings that would otherwise run and silently do something else."""
    if script.data is not None and script.dataset_name is not None:
        raise ValueError(f"give either --data ({script.data}) or --dataset_name ({script.dataset_name}), not both")
    if not _finite(train_args.temperature) or train_args.temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (rollouts sample), got {train_args.temperature!r}")
    if not (_finite(train_args.top_p) and 0 < train_args.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {train_args.top_p!r}")
    for name in ("per_device_train_batch_size", "num_generations"):
        if getattr(train_args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(train_args, name)}")
    if train_args.max_steps == 0 or train_args.max_steps < -1:
        raise ValueError(f"max_steps must be >= 1 optimizer steps (or -1: num_train_epochs), got {train_args.max_steps}")
    if train_args.max_steps == -1 and not (_finite(train_args.num_train_epochs) and train_args.num_train_epochs > 0):
        raise ValueError(f"num_train_epochs must be > 0, got {train_args.num_train_epochs!r}")
    for name in ("eval_every", "eval_samples", "eval_batch_size", "auto_layer_samples"):
        v = getattr(script, name)
        low = 0 if name == "eval_every" else 1
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    for name in ("train_rows", "eval_rows", "eval_max_new_tokens", "max_prompt_length"):
        v = getattr(script, name)
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 (or unset), got {v}")
    parse_rewards(script.reward)  # names from the one registry, checked before anything loads
    if script.reward_workers is not None and script.reward_workers < 1:
        raise ValueError(f"reward_workers must be >= 1 (or unset: one per CPU core), got {script.reward_workers}")
    if not (_finite(script.reward_timeout) and script.reward_timeout > 0):
        raise ValueError(f"reward_timeout must be a finite number of seconds > 0, got {script.reward_timeout!r}")
    if not _finite(train_args.learning_rate) or train_args.learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {train_args.learning_rate!r}")
    if train_args.learning_rate > MAX_LEARNING_RATE:
        raise ValueError(f"learning_rate {train_args.learning_rate:g} is above {MAX_LEARNING_RATE:g}: AdamW moves every "
                         "weight by about the learning rate each step (and decays it by learning_rate x weight_decay), "
                         "which overwrites the model; the paper's runs use 1e-6, the bundled run 2e-4")


def _warn_no_full_phase(train_args: Any, script: BuPOScriptArguments) -> None:
    """A warning (not an error) when the internal phase covers every rollout step of the run."""
    if script.algo == "bupo" and train_args.max_steps > 0 and train_args.internal_steps > 0:
        rollouts = math.ceil(train_args.max_steps / train_args.optimizer_steps_per_rollout)
        if train_args.internal_steps >= rollouts:
            print(f"bupo train: warning: internal_steps={train_args.internal_steps} covers the whole run "
                  f"({rollouts} rollout steps of {train_args.optimizer_steps_per_rollout} optimizer steps): "
                  "no full-policy (GRPO) phase will run", flush=True)


def check_run(train_args: Any, script: BuPOScriptArguments, model_args: Any = None) -> dict[str, Any]:
    """Validate the run once; returns the config values the algorithm fixes (:func:`algo_settings`)."""
    given = script.given is None or "internal_steps" in script.given
    fixed = algo_settings(script.algo, train_args.internal_steps, steps_given=given)
    if train_args.train_layer is not None and script.algo != "grpo":  # the control arms (bupo.training.arms)
        raise ValueError("--train_layer (the one-layer arm) is GRPO on one layer: add --algo grpo")
    if train_args.internal_objective == "full" and script.algo != "bupo":
        raise ValueError("--internal_objective full (the layers-only arm) needs an internal phase: use --algo bupo")
    validate_run_args(train_args, script)  # the checks with a field's own words first, then the generic ones
    if model_args is None:
        from bupo.training.model import default_model_args

        model_args = script.model_args or default_model_args()
    check_numbers(train_args, script, model_args)
    check_precision(train_args, model_args)
    check_deepspeed_optimizer(train_args, script)
    _warn_no_full_phase(train_args, script)  # only once every check passed
    return fixed


def _deepspeed_configs(train_args: Any) -> Iterator[tuple[str, Any]]:
    """(where from, the parsed config) of every DeepSpeed config the run would use: ``--deepspeed`` (a JSON file or a
    dict) and an accelerate config's ``deepspeed_config_file`` (``ACCELERATE_DEEPSPEED_CONFIG_FILE``)."""
    import json
    import os

    given = getattr(train_args, "deepspeed", None)
    sources = [("--deepspeed", given)] if given else []
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        sources.append(("deepspeed_config_file", os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
    for flag, value in sources:
        if isinstance(value, dict):
            yield flag, value
            continue
        try:
            with open(value, encoding="utf-8") as f:
                yield f"{flag} {value}", json.load(f)
        except (OSError, ValueError):
            continue  # unreadable: DeepSpeed / accelerate say so themselves


def check_deepspeed_optimizer(train_args: Any, script: BuPOScriptArguments) -> None:
    """BuPO holds the layers above k out of the optimizer's steps while internal through its own parameter groups
    (:mod:`bupo.training.optim`); a DeepSpeed config with an ``optimizer`` block has DeepSpeed build the optimizer
    instead, and ZeRO-3's zero gradients then decay and step those layers (docs/training.md): refused, in one line."""
    if script.algo != "bupo":
        return
    for source, config in _deepspeed_configs(train_args):
        if isinstance(config, dict) and "optimizer" in config:
            raise ValueError(f'the DeepSpeed config ({source}) defines its own "optimizer": DeepSpeed would build it '
                             "and bypass BuPO's parameter groups (layers above k would take weight decay and AdamW "
                             "steps while internal); remove that block (bupo builds AdamW from --learning_rate, "
                             "--weight_decay, --adam_beta1/2) or use --algo grpo")


def check_environment(train_args: Any) -> None:
    """What the settings need from this machine (checked by ``train`` before anything is loaded or written)."""
    from bupo.io import check_output_folder

    check_output_folder(train_args.output_dir)
