"""``bupo train``: arguments, config merging, model/data/reward assembly, in-process evaluation, run summary.

Argument precedence (lowest first): TRL/GRPOConfig defaults < the small-run defaults (only without ``--config``) <
CPU defaults (no CUDA: ``use_cpu``, fp32, no gradient checkpointing) < ``--config`` YAML < bupo's own flags
(``--model``, ``--internal-layer``, ...) < TRL-style flags given on the command line (``--learning_rate 1e-5``).

TRL's ``ModelConfig`` flags (``--dtype``, ``--attn_implementation``, ``--use_peft``, ``--lora_*``, ...) and
``--model_init_kwargs`` reach the model (:func:`model_init_kwargs`). Master weights are fp32 unless a low-precision
``dtype`` is asked for explicitly: ``bf16``/``fp16`` are autocast (TRL's default), so AdamW's small updates are not
rounded away in bf16 weights.

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
# Below this learning rate most AdamW updates of bf16 weights round away (at 1e-6, 4 steps change ~2% of the
# elements of bf16 weights against ~100% of fp32 ones): low-precision master weights then warn.
LOW_PRECISION_LR = 1e-5
# ModelConfig / GRPOConfig flags that are from_pretrained keywords, with their defaults (a flag left at its default
# does not override the same key in --model_init_kwargs)
_MODEL_FLAG_DEFAULTS: dict[str, Any] = {"dtype": "float32", "attn_implementation": None, "revision": "main",
                                        "trust_remote_code": False}


@dataclass
class BuPOScriptArguments:
    """What ``bupo train`` needs besides the trainer config (also accepted as keys of the ``--config`` YAML)."""

    # parsed by TRL's ModelConfig (--model_name_or_path, --dtype, --use_peft, ...) and copied here after parsing
    model_name_or_path: str | None = field(default=None, init=False)
    model_args: Any = field(default=None, init=False, repr=False)
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
    reward: str = field(default="boxed_exact", metadata={"help": "comma-separated: boxed_exact (paper), math_verify, final_number (last number; small models)"})
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
    "force_resume": "force_resume", "verbose": "verbose",
    "internal_steps_max": "internal_steps_max", "internal_schedule": "internal_schedule",  # issue 16
    "train_limit": "train_rows", "eval_limit": "eval_rows",  # the shared --train-limit / --eval-limit (docs/cli.md)
}
# environment variables that make a process load other code: a config file must not set them
CODE_LOADING_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "DYLD_INSERT_LIBRARIES", "DYLD_LIBRARY_PATH",
                    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
                    "PYTHONINSPECT", "PYTHONBREAKPOINT", "PYTHONPLATLIBDIR", "PYTHONSAFEPATH", "PATH",
                    "BASH_ENV", "ENV", "PERL5OPT", "NODE_OPTIONS")


def _read_yaml(path: str) -> dict[str, Any]:
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
    refused = sorted(str(k) for k in env if str(k).upper() in CODE_LOADING_ENV or str(k).upper().startswith("LD_"))
    if refused:
        raise ValueError(f"{p}: 'env' may not set {', '.join(refused)}: they make Python or the loader run other "
                         "code; set them in the shell if you really mean it")
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
    from trl import ModelConfig, TrlParser

    from bupo.training.config import BuPOConfig

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    parser = TrlParser((BuPOConfig, BuPOScriptArguments, ModelConfig), allow_abbrev=False)  # no silent prefix matches
    merged: dict[str, Any] = {}
    if config is None:
        merged.update(SMALL_RUN_DEFAULTS)
    if not cuda:
        merged.update(CPU_DEFAULTS)
    explicit = {k for k, v in (overrides or {}).items() if v is not None}
    explicit |= {a[2:].split("=")[0].replace("-", "_") for a in (trl_args or []) if a.startswith("--")}
    if config is not None:
        cfg = _read_yaml(config)
        _check_config_types(parser, cfg, config)
        merged.update(cfg)
        explicit |= set(cfg)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = parser.set_defaults_with_config(**merged)
    if unknown:
        keys = sorted({s[2:] for s in unknown[::2]})
        raise ValueError(f"unknown configuration key(s) {keys}: not a BuPOConfig/GRPOConfig/ModelConfig field nor a "
                         "bupo train argument (see bupo train --help and TRL's GRPOConfig and ModelConfig)")
    try:
        train_args, script_args, model_args, rest = parser.parse_args_into_dataclasses(
            args=list(trl_args or []), return_remaining_strings=True)
    except SystemExit as exc:  # argparse already printed why
        raise ValueError(f"could not parse the TRL arguments {trl_args!r}") from exc
    except ZeroDivisionError:  # GRPOConfig divides by these counts before checking them
        given = dict(merged)
        args_list = list(trl_args or [])
        for i, a in enumerate(args_list):
            if a.startswith("--") and "=" in a:
                given[a[2:].split("=")[0]] = a.split("=", 1)[1]
            elif a.startswith("--") and i + 1 < len(args_list):
                given[a[2:]] = args_list[i + 1]
        zero = sorted(k.replace("-", "_") for k, v in given.items()
                      if k.replace("-", "_") in _COUNT_KEYS and str(v).strip() in ("0", "0.0"))
        raise ValueError(f"{', '.join(zero) or 'a batch count'} must be >= 1 (got 0); "
                         f"{', '.join(_COUNT_KEYS)} count sequences or steps") from None
    if rest:
        raise ValueError(unrecognised_message(rest, parser))
    if script_args.algo not in ALGOS:
        raise ValueError(f"--algo must be one of {', '.join(ALGOS)}, got {script_args.algo!r}")
    if script_args.data is not None and script_args.dataset_name is not None:
        raise ValueError(f"give either --data ({script_args.data}) or --dataset_name ({script_args.dataset_name}), "
                         "not both")
    script_args.model_name_or_path = model_args.model_name_or_path
    script_args.model_args = model_args
    model_init_kwargs(train_args, model_args)  # a key given twice is an error already here
    validate_run_args(train_args, script_args, explicit)
    return train_args, script_args


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


_COUNT_KEYS = ("per_device_train_batch_size", "num_generations", "steps_per_generation", "generation_batch_size",
               "gradient_accumulation_steps", "num_iterations")
_TRUE_FALSE = {"true", "false", "yes", "no", "1", "0", "y", "n", "t", "f", "on", "off"}


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


def _finite(x: Any) -> bool:
    import math

    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_run_args(train_args: Any, script: BuPOScriptArguments, explicit: set[str] | frozenset = frozenset()) -> None:
    """ValueError (one line) for settings that would otherwise run and silently do something else; ``explicit``:
    the keys the user gave (flags, YAML, TRL arguments), to tell a default from a choice."""
    import math

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
    if script.reward_workers is not None and script.reward_workers < 1:
        raise ValueError(f"reward_workers must be >= 1 (or unset: one per CPU core), got {script.reward_workers}")
    if not (_finite(script.reward_timeout) and script.reward_timeout > 0):
        raise ValueError(f"reward_timeout must be a finite number of seconds > 0, got {script.reward_timeout!r}")
    if not _finite(train_args.learning_rate) or train_args.learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {train_args.learning_rate!r}")
    if script.algo == "grpo" and "internal_steps" in explicit and train_args.internal_steps > 0:
        raise ValueError(f"--algo grpo trains the full policy only; it cannot take --internal-steps "
                         f"{train_args.internal_steps} (use --algo bupo, or drop --internal-steps)")
    if script.algo == "bupo" and train_args.max_steps > 0 and train_args.internal_steps > 0:
        rollouts = math.ceil(train_args.max_steps / train_args.optimizer_steps_per_rollout)
        if train_args.internal_steps >= rollouts:
            print(f"bupo train: warning: internal_steps={train_args.internal_steps} covers the whole run "
                  f"({rollouts} rollout steps of {train_args.optimizer_steps_per_rollout} optimizer steps): "
                  "no full-policy (GRPO) phase will run", flush=True)


def check_environment(train_args: Any) -> None:
    """What the settings need from this machine (checked by :func:`train` before anything is loaded or written)."""
    from bupo.io import check_output_folder

    check_output_folder(train_args.output_dir)


# ---------------------------------------------------------------------------------------------------------------
# the model: TRL's ModelConfig flags, --model_init_kwargs, PEFT


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def model_init_kwargs(train_args: Any, model_args: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords: ``--model_init_kwargs`` plus the ModelConfig/GRPOConfig flags
    (``--dtype``, ``--attn_implementation``, ``--model_revision``, ``--trust_remote_code``).

    A flag left at its default does not override the same key in ``--model_init_kwargs``; the two giving different
    values is an error. ``dtype`` defaults to ``float32`` (TRL's default): fp32 master weights, with ``bf16``/``fp16``
    as autocast.
    """
    kw = dict(train_args.model_init_kwargs or {})
    if "torch_dtype" in kw:  # the pre-v5 name
        kw.setdefault("dtype", kw.pop("torch_dtype"))
    flags = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
             "revision": model_args.model_revision, "trust_remote_code": train_args.trust_remote_code}
    for key, value in flags.items():
        if value == _MODEL_FLAG_DEFAULTS[key]:
            continue
        if key in kw and kw[key] != value:
            raise ValueError(f"{key} given twice: --{'model_revision' if key == 'revision' else key} {value} and "
                             f"--model_init_kwargs {key}={kw[key]!r}; give it once")
        kw[key] = value
    kw.setdefault("dtype", "float32")
    if kw["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {kw['dtype']!r}")
    return kw


def _check_attn_implementation(name: str | None) -> None:
    if name is None:
        return
    from transformers.utils import import_utils as iu

    needs = {
        "flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package and a CUDA GPU "
                              "(pip install flash-attn --no-build-isolation)"),
        "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 (Hopper GPUs) installed"),
        "flex_attention": ("is_torch_flex_attn_available", "torch with flex attention"),
    }
    if name in needs:
        check, what = needs[name]
        fn = getattr(iu, check, None)
        if fn is not None and not fn():
            raise ValueError(f"attn_implementation {name!r} needs {what}, which this machine lacks; "
                             "use --attn_implementation sdpa (or eager)")
        return
    if "/" in name:  # a Hub kernel, e.g. kernels-community/flash-attn3
        if not _installed("kernels"):
            raise ValueError(f"attn_implementation {name!r} is a Hub kernel and needs the kernels package: "
                             "pip install kernels; or use --attn_implementation sdpa")
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    accepted = ["eager", *sorted(ALL_ATTENTION_FUNCTIONS.keys())]
    if name not in accepted:
        raise ValueError(f"unknown attn_implementation {name!r}; accepted: {', '.join(accepted)} or a Hub kernel id")


def check_model_flags(train_args: Any, model_args: Any) -> None:
    """Reject, in one line each, model/engine flags this machine cannot honour (see docs/training.md)."""
    if train_args.use_vllm:
        from bupo.engines import require_vllm

        require_vllm("--use_vllm true", instead="drop --use_vllm (rollouts then use transformers' generate)")
    lora_flags = [f for f in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                              "lora_modules_to_save", "use_rslora", "use_dora")
                  if getattr(model_args, f) != type(model_args).__dataclass_fields__[f].default]
    if not model_args.use_peft and lora_flags:
        raise ValueError(f"{', '.join('--' + f for f in lora_flags)} need --use_peft true (without it TRL ignores them)")
    if model_args.use_peft and not _installed("peft"):
        raise ValueError("--use_peft needs the peft package, which is not installed: pip install 'bupo[peft]'")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not _installed("bitsandbytes"):
        raise ValueError("--load_in_4bit / --load_in_8bit need bitsandbytes and a CUDA GPU: pip install bitsandbytes")
    kw = model_init_kwargs(train_args, model_args)
    _check_attn_implementation(kw.get("attn_implementation"))


def load_model(model_path: str, train_args: Any, model_args: Any | None) -> Any:
    """The policy model with the ModelConfig / ``--model_init_kwargs`` keywords (fp32 master weights by default).

    Warns when the weights end up bf16/fp16 (asked for explicitly, or ``dtype: auto`` on a bf16 checkpoint) and
    the learning rate is below 1e-5, where most AdamW updates round away.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if model_args is None:
        from trl import ModelConfig

        model_args = ModelConfig()
    kw = model_init_kwargs(train_args, model_args)
    dtype = kw.pop("dtype")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_kbit_device_map, get_quantization_config

        kw.setdefault("quantization_config", get_quantization_config(model_args))
        kw.setdefault("device_map", get_kbit_device_map())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                 **kw)
    low = {p.dtype for p in model.parameters() if p.is_floating_point()} & {torch.bfloat16, torch.float16}
    if low and train_args.learning_rate < LOW_PRECISION_LR:
        logger.warning("the model's weights are %s (dtype %s) and learning_rate %.1e < %.0e: most AdamW updates of "
                       "low-precision weights round away; keep dtype float32 (the default) and use bf16: true for "
                       "mixed precision", "/".join(sorted(str(d).removeprefix("torch.") for d in low)), dtype,
                       train_args.learning_rate, LOW_PRECISION_LR)
    return model


def peft_config(model_args: Any | None) -> Any:
    """TRL's ``get_peft_config``: a ``peft.LoraConfig`` from the ``--use_peft`` / ``--lora_*`` flags, or None."""
    if model_args is None or not model_args.use_peft:
        return None
    from trl import get_peft_config

    return get_peft_config(model_args)


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
    projection: str = "raw",
) -> tuple[int | None, str]:
    """``(k, source)``: an int is used as given; ``"auto"`` reads the analysis' suggested (boundary) layer,
    running a short analysis into ``<output_dir>/analysis`` when none exists.

    A given or cached analysis is read first, so one without a usable boundary fails at once (ValueError with its
    reason and the options) and never triggers a new analysis. Before running one, a one-forward check of the
    ``projection`` (:func:`bupo.analysis.health.quick_health`) refuses a degenerate projection with its numbers.
    ``device``: where that short analysis runs (``bupo train`` passes the training device, so a model loaded on the
    CPU is moved to the accelerator first instead of generating on the CPU); None leaves the model where it is.
    """
    if value is None or isinstance(value, int):
        return value, "given"
    from bupo.analysis.run import suggested_layer

    given = analysis or find_analysis(model_path, output_dir)
    if given is not None:
        return suggested_layer(given, projection=projection), f"analysis {given}"
    # no analysis yet: run a short one (the paper: 0.44% of the training cost) and keep it next to the run
    from bupo.analysis.run import analyze

    out = Path(output_dir) / "analysis"
    if is_main:
        if device is not None:
            model.to(device)  # the trainer would move it there anyway
        _refuse_degenerate(model, tokenizer, rows, template, projection)
        logger.info("--internal-layer auto: no analysis found, analysing %d responses into %s", samples, out)
        # analyze runs in eval mode and restores every module's training flag itself
        analyze(model, tokenizer, data=rows[:samples], out_dir=out, max_samples=samples,
                max_new_tokens=max_new_tokens, template=template, figures=False, projection=projection,
                progress=True)  # minutes on a real model: show it
    _barrier()
    return suggested_layer(out, projection=projection), f"analysis {out} (run by bupo train, {samples} responses)"


def _check_prompts(tokenizer: Any, rows: list[dict], template: str, n: int = 4) -> list[str]:
    from bupo.data.templates import render_prompt

    return [render_prompt(tokenizer, list(r["prompt"]), template) for r in rows[:n] if "prompt" in r]


def _refuse_degenerate(model: Any, tokenizer: Any, rows: list[dict], template: str, projection: str) -> None:
    """--internal-layer auto: a degenerate projection has no boundary; say so before a long analysis."""
    from bupo.analysis.health import quick_health
    from bupo.analysis.summary import boundary_options

    prompts = [] if tokenizer is None else _check_prompts(tokenizer, rows, template)
    if not prompts:
        return
    health = quick_health(model, tokenizer, prompts, projection=projection)
    if health["degenerate"]:
        opts = "; ".join(boundary_options(len(health["layer_entropy"]), degenerate=True, projection=projection))
        raise ValueError(f"--internal-layer auto: no usable boundary: {health['message']} (measured on "
                         f"{health['measured_on']}). Options: {opts}")


def check_internal_policy(model: Any, tokenizer: Any, rows: list[dict], template: str, layer: int,
                          projection: str) -> dict[str, Any] | None:
    """Before any training step: is pi^layer readable? Logs a warning with the numbers when it is not."""
    from bupo.analysis.health import check_layer, quick_health

    prompts = [] if tokenizer is None else _check_prompts(tokenizer, rows, template)
    if not prompts:
        return None
    health = quick_health(model, tokenizer, prompts, projection=projection)
    warning = check_layer(health, layer)
    if warning:
        logger.warning("degenerate internal policy: %s", warning)
    L = len(health["layer_entropy"])
    return {"layer": layer, "projection": projection, "degenerate": bool(warning), "warning": warning,
            "entropy": health["layer_entropy"][layer], "final_entropy": health["final_entropy"],
            "top1_agreement": health["layer_top1_agreement"][layer], "resid_rms": (health["resid_rms"] or [None] * L)[layer],
            "measured_on": health["measured_on"]}


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
    """The checkpoint to resume from: ``"latest"`` = the newest *complete* checkpoint-* in ``output_dir`` (torn ones,
    from a kill during a save, are skipped and named in one line); an explicit folder must be complete."""
    if resume is None:
        return None
    from bupo.training.trainer import checkpoint_problem

    if resume == "latest":
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = Path(output_dir)
        found = []
        if out.is_dir():
            for d in out.iterdir():
                tail = d.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
                if d.is_dir() and d.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and tail.isdigit():
                    found.append((int(tail), d))
        skipped = []
        for _, d in sorted(found, reverse=True):
            problem = checkpoint_problem(d)
            if problem is None:
                if skipped:
                    print(f"bupo train: --resume: skipped incomplete {'; '.join(skipped)}; resuming from {d.name}",
                          flush=True)
                return str(d)
            skipped.append(f"{d.name} ({problem})")
        if skipped:
            raise ValueError(f"--resume: no complete checkpoint in {output_dir}: {'; '.join(skipped)}")
        raise ValueError(f"--resume: no checkpoint-* folder in {output_dir}")
    if not Path(resume).is_dir():
        raise ValueError(f"--resume: {resume} is not a checkpoint folder")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ValueError(f"--resume: {resume} is an incomplete checkpoint ({problem}); resume from a complete one "
                         "or give --resume alone for the newest complete one")
    return resume


def check_resume_matches(checkpoint: str, current: dict[str, Any], force: bool) -> None:
    """ValueError naming every setting of ``current`` that differs from the checkpoint's run, unless ``force``."""
    from bupo.training.trainer import read_checkpoint_marker

    marker = read_checkpoint_marker(checkpoint)
    saved = (marker or {}).get("run")
    if not isinstance(saved, dict):
        logger.warning("--resume: %s records no run settings (saved by an older bupo or plain TRL); not checked",
                       checkpoint)
        return
    diffs = [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and saved[k] != v]
    if not diffs:
        return
    if force:
        print(f"bupo train: warning: --force-resume: resuming {checkpoint} with changed {'; '.join(diffs)}",
              flush=True)
        return
    raise ValueError(f"--resume: the run differs from {checkpoint}'s: {'; '.join(diffs)}; give the same settings, "
                     "or --force-resume to resume anyway")


def _checkpoint_step(folder: str) -> int:
    import json

    return int(json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def _finished_run(trainer: Any, checkpoint: str, step: int) -> Any:
    """The TrainOutput of a run whose checkpoint already holds every optimizer step: its weights and state, loaded."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    from bupo.training.trainer import read_checkpoint_marker

    print(f"bupo train: {checkpoint} is at optimizer step {step} >= max_steps {trainer.args.max_steps}: "
          "nothing left to train; saving its weights", flush=True)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    loss_sum = float((read_checkpoint_marker(checkpoint) or {}).get("train_loss_sum", float("nan")))
    return TrainOutput(step, loss_sum / max(step, 1), {"train_loss": loss_sum / max(step, 1)})


def _data_fingerprint(dataset: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for prompt, gt in zip(dataset["prompt"], dataset["ground_truth"], strict=True):
        h.update(prompt.encode("utf-8", "surrogatepass") + b"\0" + gt.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def train(train_args: Any, script: BuPOScriptArguments) -> dict[str, Any]:
    """Assemble and run one training; returns the run summary (also written to ``<output_dir>/bupo_run.json``)."""
    from transformers import AutoTokenizer

    from bupo.data.templates import record_template
    from bupo.evaluation import resolve_template
    from bupo.generation import context_length
    from bupo.io import atomic_write_json
    from bupo.rewards import make_reward_func
    from bupo.training.data import BUNDLED, build_prompt_dataset, load_training_rows
    from bupo.training.trainer import BuPOTrainer

    # what this machine cannot honour (vLLM, peft, attention kernels, an unwritable --out) fails here, before
    # anything is loaded; parse_train_args stays machine-independent so presets parse anywhere
    check_model_flags(train_args, script.model_args or _default_model_args())
    check_environment(train_args)
    out_dir = Path(train_args.output_dir)
    resume = _resolve_resume(script.resume, str(out_dir))
    from bupo.models import resolve_model

    model_path = resolve_model(script.model_name_or_path)  # bupo name, folder or Hub id; one-line errors
    if script.algo == "grpo":
        train_args.internal_steps = 0
    elif train_args.internal_steps <= 0:
        raise ValueError("--algo bupo needs --internal-steps S > 0 (rollout steps on the internal policy); "
                         "use --algo grpo for plain GRPO")

    # fp32 master weights unless a low-precision dtype is asked for; bf16/fp16 are autocast (TRL's default)
    model = load_model(model_path, train_args, script.model_args)
    tok_kw = {k: v for k, v in model_init_kwargs(train_args, script.model_args or _default_model_args()).items()
              if k in ("revision", "trust_remote_code")}
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left", truncation_side="left", **tok_kw)
    template = resolve_template(tokenizer, script.template)
    record_template(tokenizer, template)  # saved with the tokenizer: bupo eval/analyze --template auto reuse it

    n_rows = script.train_rows or 2048
    if script.dataset_name is not None:
        rows = load_dataset_rows(script.dataset_name, script.dataset_config, script.dataset_train_split)
    else:
        rows = load_training_rows(script.data, split="train", n=n_rows, seed=train_args.seed)
    prompt_limit, limit_reason = prompt_length_limit(script.max_prompt_length, train_args.max_completion_length,
                                                     context_length(model))
    dataset = build_prompt_dataset(rows, tokenizer, template, max_prompt_length=prompt_limit,
                                   limit=script.train_rows)
    considered = len(rows) if script.train_rows is None else min(len(rows), script.train_rows)
    dropped = considered - len(dataset)
    if dropped:
        logger.warning("dropped %d of %d training prompts longer than %s tokens (%s)", dropped, considered,
                       prompt_limit, limit_reason)
    data_spec = (script.dataset_name if script.dataset_name is not None else (script.data or BUNDLED))
    eval_sets = _eval_sets(script.eval_data, data_spec, script.eval_rows)
    _check_eval_context(eval_sets, tokenizer, template, script, train_args, context_length(model))
    prompts_per_rollout = train_args.generation_batch_size // train_args.num_generations
    if len(dataset) < prompts_per_rollout:
        raise ValueError(f"the training data has {len(dataset)} usable prompts, fewer than one generation batch "
                         f"needs ({train_args.generation_batch_size} completions / num_generations "
                         f"{train_args.num_generations} = {prompts_per_rollout} prompts); give more rows or a "
                         "smaller per_device_train_batch_size x steps_per_generation")

    layer_value = train_args.internal_layer
    if script.algo == "grpo" and layer_value == "auto":
        layer_value = None  # GRPO needs no layer; an explicit k is kept for logging pi^k's entropy
    k, layer_source = resolve_internal_layer(
        layer_value, model=model, tokenizer=tokenizer, model_path=model_path, output_dir=str(out_dir),
        analysis=script.analysis, rows=rows, template=template, samples=script.auto_layer_samples,
        max_new_tokens=train_args.max_completion_length,
        is_main=int(os.environ.get("RANK", "0")) == 0, device=train_args.device,
        projection=train_args.internal_projection)
    train_args.internal_layer = k
    policy_check = None
    if script.algo == "bupo" and k is not None:  # named with its numbers before the first rollout, not after
        policy_check = check_internal_policy(model, tokenizer, rows, template, k, train_args.internal_projection)

    reward_funcs = [make_reward_func(name.strip(), timeout=script.reward_timeout, workers=script.reward_workers)
                    for name in script.reward.split(",") if name.strip()]
    if not reward_funcs:
        raise ValueError("--reward needs at least one reward name (boxed_exact, math_verify, final_number)")
    train_args.model_init_kwargs = None  # consumed by load_model (TRL would warn that it ignores them)
    from bupo.engines import training_engine, trl_colocate_defaults

    with trl_colocate_defaults(train_args, model):  # vLLM colocate: bupo's engine settings for this machine
        trainer = BuPOTrainer(model=model, reward_funcs=reward_funcs, args=train_args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config(script.model_args))
    _check_launcher(trainer)
    from bupo.training.console import install_console

    install_console(trainer, verbose=script.verbose)  # bar + switch/end lines; raw TRL dicts only with --verbose
    trainer.bupo_run_extra = {
        "model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "data": str(Path(data_spec).resolve()) if data_spec != BUNDLED and Path(data_spec).exists() else data_spec,
        "data_fingerprint": _data_fingerprint(dataset),
    }
    if resume is not None:
        check_resume_matches(resume, {**trainer.bupo_run_identity(), **trainer.bupo_run_extra}, script.force_resume)
    records: list[dict] = []
    if eval_sets:
        trainer.add_callback(make_eval_callback(trainer, eval_sets, script, template, out_dir, records))

    n_per = train_args.optimizer_steps_per_rollout
    summary: dict[str, Any] = {
        "algo": script.algo,
        "model": model_path,
        "data": data_spec,
        "template": template,
        "weights_dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch."),
        "mixed_precision": "bf16" if train_args.bf16 else ("fp16" if train_args.fp16 else "no"),
        "peft": None if script.model_args is None or not script.model_args.use_peft else "lora",
        "prompt_length_limit": prompt_limit,
        "prompt_length_limit_reason": limit_reason,
        "prompts_dropped": dropped,
        "reward": script.reward,
        "temperature": train_args.temperature,  # rollouts and in-training evaluations sample at it
        "max_completion_length": train_args.max_completion_length,
        "generation": training_engine(train_args, model),  # rollouts: HF generate or vLLM (mode, version, settings)
        "internal_layer": k,
        "internal_layer_paper": None if k is None else k + 1,
        "internal_layer_source": layer_source,
        "internal_steps": train_args.internal_steps,
        "internal_projection": train_args.internal_projection,
        "internal_policy_check": policy_check,
        "optimizer_steps_per_rollout": n_per,
        "full_phase_starts_at_optimizer_step": train_args.internal_steps * n_per + 1,
        "max_steps": train_args.max_steps,
        "train_rows": len(dataset),
        "conventions": "internal_layer is 0-based k (paper layer k+1); internal_steps counts rollout steps (one "
                       "generation batch = optimizer_steps_per_rollout optimizer steps); entropies in nats",
    }
    trainer.bupo_run = summary  # the model card (bupo.training.card) reads template, data and k's source here
    t0 = time.time()
    done = _checkpoint_step(resume) if resume is not None else 0
    if resume is not None and train_args.max_steps > 0 and done >= train_args.max_steps:
        # training had finished (a kill hit the final save): transformers would train past max_steps; keep the
        # checkpoint's weights and train nothing
        result = _finished_run(trainer, resume, done)
    else:
        result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out_dir))  # the tokenizer too (Trainer._save saves processing_class)
    summary["global_step"] = trainer.state.global_step
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
        trainer.create_model_card(model_name=out_dir.name)  # README.md with the final evaluation
    return summary


def _check_launcher(trainer: Any) -> None:
    """A launcher config asking for FSDP or DeepSpeed that the trainer did not get is an error, not a silent DDP run
    (accelerate 1.15 turns FSDP on only for GPU-like devices: an FSDP config on the CPU otherwise becomes DDP)."""
    for env, enabled, name in (("ACCELERATE_USE_FSDP", trainer.is_fsdp_enabled, "FSDP"),
                               ("ACCELERATE_USE_DEEPSPEED", trainer.is_deepspeed_enabled, "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true" and not enabled:
            raise ValueError(f"the accelerate config asks for {name}, but accelerate did not enable it on this "
                             f"machine ({trainer.accelerator.distributed_type}; {name} needs GPUs); use "
                             "the cpu accelerate config (bupo recipes path cpu) for CPU processes")


def _default_model_args() -> Any:
    from trl import ModelConfig

    return ModelConfig()


def prompt_length_limit(max_prompt_length: int | None, max_completion_length: int,
                        context: int | None) -> tuple[int | None, str]:
    """``(limit, reason)``: the longest prompt kept for training, and why.

    Prompts longer than ``max_prompt_length`` are dropped (verl's ``filter_overlong_prompts``), and so are prompts
    that leave no room for ``max_completion_length`` in the model's ``context`` (``max_position_embeddings``): a
    counted drop, since one long prompt must not stop a run over thousands. ValueError when no prompt could fit.
    """
    if context is not None and max_completion_length >= context:
        raise ValueError(f"max_completion_length {max_completion_length} leaves no room for a prompt in the model's "
                         f"max_position_embeddings {context}; lower --max_completion_length")
    room = None if context is None else context - max_completion_length
    if room is not None and (max_prompt_length is None or room < max_prompt_length):
        return room, (f"max_position_embeddings {context} - max_completion_length {max_completion_length}"
                      + ("" if max_prompt_length is None else f" < max_prompt_length {max_prompt_length}"))
    return max_prompt_length, "max_prompt_length"


def _check_eval_context(sets: dict[str, list[dict]], tokenizer: Any, template: str, script: BuPOScriptArguments,
                        train_args: Any, context: int | None) -> None:
    # in-training evaluation must not fail half-way through a run: check its prompts now (bupo.generation would
    # reject them at the first evaluation)
    if not sets or context is None:
        return
    from bupo.data.templates import render_prompt
    from bupo.generation import check_context, encode_prompt

    max_new = script.eval_max_new_tokens or train_args.max_completion_length
    for name, rows in sets.items():
        lengths = [len(encode_prompt(tokenizer, render_prompt(tokenizer, r["prompt"], template))) for r in rows]
        check_context(lengths, max_new, context, what=f"eval prompts of {name} (eval_max_new_tokens)")


def load_dataset_rows(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of ``datasets.load_dataset(name, config, split=split)`` (a Hub id, a local folder or data file), or of
    ``datasets.load_from_disk`` for a folder written by ``save_to_disk``; checked like ``--data`` rows."""
    import datasets

    from bupo.data.datasets import validate_rows

    p = Path(name)
    try:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"--dataset_name {name}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ValueError(f"--dataset_name {name}: not found as a local dataset folder/file nor on the Hub "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return validate_rows(ds.to_list(), f"--dataset_name {name} ({split})")


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
