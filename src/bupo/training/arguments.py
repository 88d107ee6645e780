"""``bupo train``'s arguments: the keys besides the trainer config, the default layers, and their parsing.

Precedence (lowest first): TRL/GRPOConfig defaults < the small-run defaults (only without ``--config``) < the CPU
defaults (no CUDA: ``use_cpu``, fp32, no gradient checkpointing) < ``--config`` YAML < bupo's own flags
(``--model``, ``--internal-layer``, ...) < TRL-style flags on the command line (``--learning_rate 1e-5``).

:func:`parse_train_args` reads the command line and YAML (TRL's parser); :func:`run_settings` builds the same
objects from Python values with no parser at all. Neither validates the run: :func:`bupo.training.run.train` does
that once (:mod:`bupo.training.validation`). Standard library only at import time (``bupo train --help``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from bupo.rewards.api import REWARD_NAMES
from bupo.training.config_env import ENV_ALLOWED_TEXT, env_allowed

ALGOS = ("bupo", "grpo")


@dataclass
class BuPOScriptArguments:
    """What ``bupo train`` needs besides the trainer config (also accepted as keys of the ``--config`` YAML)."""

    # parsed by TRL's ModelConfig (--model_name_or_path, --dtype, --use_peft, ...) and copied here after parsing
    model_name_or_path: str | None = field(default=None, init=False)
    model_args: Any = field(default=None, init=False, repr=False)
    # the keys the user gave (flags, YAML, TRL arguments), set by the parsers; None (built in Python): every setting
    # of the config counts as given
    given: frozenset[str] | None = field(default=None, init=False, repr=False)
    data: str | None = field(default=None, metadata={
        "help": "training rows: .parquet / .jsonl / .json (paper shape), or 'bundled' (default: the bundled task)"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "training rows from `datasets` (like TRL's scripts): a Hub id or a local dataset folder/file; "
        "rows in the paper's shape (prompt messages, reward_model.ground_truth); instead of --data"})
    dataset_config: str | None = field(default=None, metadata={"help": "the dataset's configuration name"})
    dataset_train_split: str = field(default="train", metadata={"help": "the split of --dataset_name to train on"})
    eval_data: list[str] | None = field(default=None, metadata={
        "help": "held-out files evaluated in-process (Avg@K / Pass@K); 'bundled' = the bundled task's test split; "
        "'none' disables (default: bundled when training on the bundled task)"})
    algo: str = field(default="bupo", metadata={"help": "bupo (internal phase, then GRPO) or grpo (internal_steps=0)"})
    template: str = field(default="auto", metadata={
        "help": "prompt template: auto, qwen3_no_thinking, chat, octothinker (auto: qwen3_no_thinking when the "
        "tokenizer's chat template honours enable_thinking, else chat, else octothinker)"})
    reward: str = field(default="boxed_exact", metadata={
        "help": f"comma-separated, summed: {', '.join(REWARD_NAMES)} (bupo.rewards.REWARDS; boxed_exact is the "
        "paper's, final_number the last number, for small models)"})
    reward_timeout: float = field(default=5.0, metadata={"help": "seconds per completion for each reward call"})
    reward_workers: int | None = field(default=None, metadata={
        "help": "worker processes scoring math_verify (default: $BUPO_REWARD_WORKERS, else the CPU cores per process)"})
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
    verbose: bool = field(default=False, metadata={
        "help": "print TRL's raw log dicts (and its own progress bar unless disable_tqdm) instead of bupo's console"})
    resume: str | None = field(default=None, metadata={
        "help": "checkpoint folder to resume from, or 'latest' (the newest complete checkpoint-* in the output folder)"})
    force_resume: bool = field(default=False, metadata={
        "help": "resume even when internal_layer / internal_steps / projection / optimizer steps per rollout / model "
        "/ data differ from the checkpoint's run (refused otherwise)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run in the output folder (its model, checkpoints, evaluations), or with resume the "
        "checkpoints newer than the one resumed from (refused otherwise)"})


# A run that finishes in a few minutes on 2 CPU cores with the bundled model and task. TRL settings equal to
# GRPOConfig's defaults are pinned all the same: the calibrated run must not drift with TRL's defaults.
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
    "eval_rows": 100,
}
CPU_DEFAULTS: dict[str, Any] = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
# bupo's own flags -> config keys
FLAG_KEYS = {
    "model": "model_name_or_path", "data": "data", "eval_data": "eval_data", "algo": "algo",
    "internal_layer": "internal_layer", "internal_steps": "internal_steps", "out": "output_dir",
    "template": "template", "reward": "reward", "analysis": "analysis", "resume": "resume",
    "force_resume": "force_resume", "overwrite": "overwrite", "verbose": "verbose",
    "internal_steps_max": "internal_steps_max", "internal_schedule": "internal_schedule",
    "train_limit": "train_rows", "eval_limit": "eval_rows",  # the shared --train-limit / --eval-limit (docs/cli.md)
}
_COUNT_KEYS = ("per_device_train_batch_size", "num_generations", "steps_per_generation", "generation_batch_size",
               "gradient_accumulation_steps", "num_iterations")
_TRUE_FALSE = {"true", "false", "yes", "no", "1", "0", "y", "n", "t", "f", "on", "off"}


def default_layers(*, preset: bool, cuda: bool) -> dict[str, Any]:
    """The defaults under a run's own settings: the small run (only without a preset) and, without CUDA, the CPU
    settings on top."""
    return {**({} if preset else SMALL_RUN_DEFAULTS), **({} if cuda else CPU_DEFAULTS)}


def _unknown_keys_message(keys: list[str]) -> str:
    return (f"unknown configuration key(s) {keys}: not a BuPOConfig/GRPOConfig/ModelConfig field nor a "
            "bupo train argument (see bupo train --help and TRL's GRPOConfig and ModelConfig)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_yaml(path: str) -> dict[str, Any]:
    """The ``--config`` mapping (a file or a shipped preset's name); its ``env:`` mapping (only the variables of
    :mod:`bupo.training.config_env`'s allowlist) is applied to ``os.environ`` and removed. ``trust_remote_code``
    (top level or in ``model_init_kwargs``) is refused: only the command line's ``--trust-remote-code`` sets it."""
    import yaml

    from bupo.recipes import resolve_config

    p = resolve_config(path)  # a file, or the name of a shipped preset (bupo recipes)
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
    refused = sorted(str(k) for k in env if not env_allowed(str(k)))
    if refused:
        raise ValueError(f"{p}: 'env' may not set {', '.join(refused)}; accepted: {ENV_ALLOWED_TEXT} (set others in "
                         "the shell if you really mean it)")
    _refuse_remote_code(cfg, p)
    for k, v in env.items():
        os.environ[str(k)] = str(v)
    return cfg


def _refuse_remote_code(cfg: dict[str, Any], path: Any) -> None:
    from bupo.training.model import REMOTE_CODE_REFUSED

    init = cfg.get("model_init_kwargs")
    if cfg.get("trust_remote_code") not in (None, False, "false", "False"):
        raise ValueError(REMOTE_CODE_REFUSED.format(where=f"{path}: the config"))
    if isinstance(init, dict) and init.get("trust_remote_code") not in (None, False, "false", "False"):
        raise ValueError(REMOTE_CODE_REFUSED.format(where=f"{path}: model_init_kwargs"))


def run_settings(values: dict[str, Any] | None = None, *, cuda: bool | None = None) -> tuple[Any, BuPOScriptArguments]:
    """``(BuPOConfig, BuPOScriptArguments)`` of ``bupo train`` without a preset, built directly (no parser): the
    small-run and CPU defaults, then ``values`` (BuPOConfig / GRPOConfig / ModelConfig fields and bupo train keys,
    as Python values; None leaves the default). ``script.model_args`` holds the ModelConfig."""
    from trl import ModelConfig

    from bupo.training.config import BuPOConfig

    given = {k: v for k, v in (values or {}).items() if v is not None}
    merged = {**default_layers(preset=False, cuda=_cuda() if cuda is None else cuda), **given}
    parts: list[dict[str, Any]] = [{}, {}, {}]
    owners = (BuPOConfig, BuPOScriptArguments, ModelConfig)
    names = [{f.name for f in fields(dc) if f.init} for dc in owners]
    unknown = sorted(k for k in merged if not any(k in n for n in names))
    if unknown:
        raise ValueError(_unknown_keys_message(unknown))
    for key, value in merged.items():
        parts[next(i for i, n in enumerate(names) if key in n)][key] = value
    config, script, model_args = (dc(**kw) for dc, kw in zip(owners, parts, strict=True))
    return config, _with_model(script, model_args, set(given))


def _with_model(script: BuPOScriptArguments, model_args: Any, given: set[str]) -> BuPOScriptArguments:
    script.model_name_or_path = model_args.model_name_or_path
    script.model_args = model_args
    script.given = frozenset(given)
    return script


def parse_train_args(
    trl_args: list[str] | None = None,
    *,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    cuda: bool | None = None,
) -> tuple[Any, BuPOScriptArguments]:
    """``(BuPOConfig, BuPOScriptArguments)`` from the layered sources (see the module docstring)."""
    from trl import ModelConfig, TrlParser

    from bupo.training.config import BuPOConfig

    parser = TrlParser((BuPOConfig, BuPOScriptArguments, ModelConfig), allow_abbrev=False)  # no silent prefix matches
    merged = default_layers(preset=config is not None, cuda=_cuda() if cuda is None else cuda)
    explicit = {k for k, v in (overrides or {}).items() if v is not None}
    explicit |= {a[2:].split("=")[0].replace("-", "_") for a in (trl_args or []) if a.startswith("--")}
    if config is not None:
        cfg = _yaml_shapes(parser, read_yaml(config), config)
        _check_config_types(parser, cfg, config)
        merged.update(cfg)
        explicit |= set(cfg)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = parser.set_defaults_with_config(**merged)
    if unknown:
        raise ValueError(_unknown_keys_message(sorted({s[2:] for s in unknown[::2]})))
    try:
        train_args, script_args, model_args, rest = parser.parse_args_into_dataclasses(
            args=list(trl_args or []), return_remaining_strings=True)
    except SystemExit as exc:  # argparse already printed why
        raise ValueError(f"could not parse the TRL arguments {trl_args!r}") from exc
    except ZeroDivisionError:  # GRPOConfig divides by these counts before checking them
        raise ValueError(_zero_count_message(merged, list(trl_args or []))) from None
    if rest:
        raise ValueError(unrecognised_message(rest, parser))
    return train_args, _with_model(script_args, model_args, explicit)


def _zero_count_message(merged: dict[str, Any], args_list: list[str]) -> str:
    given = dict(merged)
    for i, a in enumerate(args_list):
        if a.startswith("--") and "=" in a:
            given[a[2:].split("=")[0]] = a.split("=", 1)[1]
        elif a.startswith("--") and i + 1 < len(args_list):
            given[a[2:]] = args_list[i + 1]
    zero = sorted(k.replace("-", "_") for k, v in given.items()
                  if k.replace("-", "_") in _COUNT_KEYS and str(v).strip() in ("0", "0.0"))
    return (f"{', '.join(zero) or 'a batch count'} must be >= 1 (got 0); "
            f"{', '.join(_COUNT_KEYS)} count sequences or steps")


def unrecognised_message(rest: list[str], parser: Any) -> str:
    """``unrecognised arguments [...]`` with the closest valid flag of each unknown one (TRL's fields, bupo train's
    flags); the underscore hint only when the user typed dashes."""
    from bupo.cli_common import unknown_flag_hints

    candidates = ["--" + f.replace("_", "-") for f in FLAG_KEYS] + ["--config", "--help-all"]  # bupo's: dashes
    candidates += [a.option_strings[0] for a in parser._actions if a.option_strings]  # TRL's: underscores
    hints = unknown_flag_hints(rest, candidates)
    msg = f"unrecognised arguments {rest}" + hints
    typed_dashes = any(a.startswith("--") and "-" in a[2:].split("=")[0] for a in rest)
    if typed_dashes and "_" in hints:  # pointed at a TRL field: say how TRL writes them
        msg += "; TRL arguments are written with underscores (--learning_rate 1e-5)"
    return msg


def _yaml_shapes(parser: Any, cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """The YAML's values in the shape their fields take: one item for a list field becomes a list of one
    (``eval_data: none`` is the list ``[none]``, never iterated letter by letter), a list of reward names becomes
    ``"a,b"``; a list for a one-value text field and an empty (null) list field are a ValueError (one line)."""
    actions = {a.dest: a for a in parser._actions}
    out = dict(cfg)
    for key, value in cfg.items():
        a = actions.get(key)
        if a is None:
            continue
        if a.nargs in ("+", "*"):
            if value is None:
                raise ValueError(f"{path}: key {key!r} is empty (null); give a list or one value"
                                 + (" ('none' turns evaluation off)" if key == "eval_data" else ""))
            if not isinstance(value, list):
                out[key] = [value]
        elif key == "reward" and isinstance(value, list):
            out[key] = ",".join(str(v) for v in value)  # the names, summed (parse_rewards checks each)
        elif isinstance(value, list) and a.type is str:  # (numbers: _check_config_types says "not a number")
            raise ValueError(f"{path}: key {key!r} takes one value, got a list ({value!r:.60})")
    return out


def _check_config_types(parser: Any, cfg: dict[str, Any], path: str) -> None:
    """ValueError naming the first key of the YAML whose value has the wrong type for its field (argparse would
    otherwise print the whole usage and blame the command line, or take a list for a number)."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in cfg.items():
        a = actions.get(key)
        if a is None or value is None:
            continue
        values = value if (a.nargs in ("+", "*") and isinstance(value, list)) else [value]
        for v in values:
            kind = _type_problem(a, v)
            if kind:
                raise ValueError(f"{path}: key {key!r}: {v!r} is not {kind}")


def _type_problem(action: Any, v: Any) -> str | None:
    t = action.type
    name = getattr(t, "__name__", "")
    if t is int:
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip().lstrip("+-").isdigit())
        return None if ok else "an integer"
    if t is float:
        if isinstance(v, bool | list | dict):
            return "a number"
        try:
            float(v)
        except (TypeError, ValueError):
            return "a number"
        return None
    if name == "string_to_bool":
        return None if isinstance(v, bool) or str(v).strip().lower() in _TRUE_FALSE else "true or false"
    if action.choices:
        accepted = [str(getattr(c, "value", c)) for c in action.choices]
        return None if str(getattr(v, "value", v)) in accepted else f"one of {', '.join(accepted)}"
    return None
