"""``bupo train --help``: the BuPOConfig fields, the ``bupo train`` keys and the common GRPOConfig / ModelConfig fields
with their defaults (``--help-all``: every field). Imports TRL, so only ``--help`` itself pays for it."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

# GRPOConfig / TrainingArguments / ModelConfig fields most runs set (the rest: bupo train --help-all)
COMMON_FIELDS = (
    "learning_rate", "max_steps", "per_device_train_batch_size", "num_generations", "steps_per_generation",
    "generation_batch_size", "gradient_accumulation_steps", "num_iterations", "max_completion_length",
    "temperature", "top_p", "beta", "epsilon", "epsilon_high", "loss_type", "lr_scheduler_type", "warmup_ratio",
    "weight_decay", "max_grad_norm", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "seed",
    "bf16", "gradient_checkpointing", "use_vllm", "vllm_mode", "report_to", "output_dir", "dtype",
    "attn_implementation", "use_peft", "lora_r", "lora_alpha",
)


def _fields() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """(BuPO fields, bupo train keys, GRPOConfig/TrainingArguments fields, ModelConfig fields)."""
    from trl import GRPOConfig, ModelConfig

    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.config import BuPOConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    bupo = [f for f in dataclasses.fields(BuPOConfig) if f.name not in grpo and f.init]
    script = [f for f in dataclasses.fields(BuPOScriptArguments) if f.init]
    trainer = [f for f in dataclasses.fields(GRPOConfig) if f.init and not f.name.startswith("_")]
    model = [f for f in dataclasses.fields(ModelConfig) if f.init]
    return bupo, script, trainer, model


def _default(f: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return f.default_factory()  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - only for display
            return None
    return None


def _show(value: Any) -> str:
    value = getattr(value, "value", value)  # enums
    return "None" if value is None else str(value)


def _shorten(text: str, limit: int = 240) -> str:
    """The first sentences of a long TRL help text, up to about ``limit`` characters."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return (text[: cut + 1] if cut > 40 else text[:limit].rsplit(" ", 1)[0]) + " [...]"


def _entry(f: Any, width: int, small_run: dict[str, Any], short: bool = False) -> str:
    default = f"default {_show(_default(f))}"
    if f.name in small_run and small_run[f.name] != _default(f):
        default += f"; bupo train without --config: {_show(small_run[f.name])}"
    text = " ".join(str(f.metadata.get("help", "")).split())
    if short:
        text = _shorten(text)
    head = f"  --{f.name}"
    body = textwrap.wrap(f"({default}) {text}".strip(), width=max(40, width - 24))
    if len(head) <= 22 and body:
        lines = [f"{head:<24}{body[0]}"] + [" " * 24 + b for b in body[1:]]
    else:
        lines = [head] + [" " * 24 + b for b in body]
    return "\n".join(lines)


def config_help(*, everything: bool = False, width: int = 100) -> str:
    """The help sections appended to ``bupo train --help`` (``everything``: every GRPOConfig / ModelConfig field)."""
    from bupo.training.arguments import default_layers

    try:
        bupo, script, trainer, model = _fields()
    except ImportError as exc:  # TRL missing: the bupo flags above still tell most of it
        return f"\n(TRL is not importable here, so its fields are not listed: {exc})\n"
    small = default_layers(preset=False, cuda=False)
    out = ["", "BuPOConfig fields (BuPO; --name value on the command line or name: value in --config YAML):"]
    out += [_entry(f, width, small) for f in bupo]
    out += ["", "bupo train keys (also --config YAML keys; the flags above set some of them):"]
    out += [_entry(f, width, small) for f in script]
    if everything:
        out += ["", "GRPOConfig / TrainingArguments fields (TRL):"]
        out += [_entry(f, width, small) for f in trainer]
        out += ["", "ModelConfig fields (TRL; they reach from_pretrained):"]
        out += [_entry(f, width, small) for f in model]
    else:
        by_name = {f.name: f for f in trainer + model}
        out += ["", "common GRPOConfig / TrainingArguments / ModelConfig fields (TRL; all of them: bupo train --help-all):"]
        out += [_entry(by_name[n], width, small, short=True) for n in COMMON_FIELDS if n in by_name]
    out += ["", "TRL's fields are written with underscores (--learning_rate 1e-5); --learning-rate works too. "
            "--dtype here is TRL's ModelConfig field (the weights' dtype for training; see docs/cli.md)."]
    return "\n".join(out) + "\n"
