"""The policy model of a ``bupo train`` run: TRL's ``ModelConfig`` flags, ``--model_init_kwargs``, PEFT.

TRL's ModelConfig flags (``--dtype``, ``--attn_implementation``, ``--use_peft``, ``--lora_*``, ...) and
``--model_init_kwargs`` reach the model (:func:`model_init_kwargs`). Master weights are fp32 unless a low-precision
``dtype`` is asked for explicitly: ``bf16``/``fp16`` are autocast (TRL's default), so AdamW's small updates are not
rounded away in bf16 weights.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Below this learning rate most AdamW updates of bf16 weights round away (at 1e-6, 4 steps change ~2% of the
# elements of bf16 weights against ~100% of fp32 ones): low-precision master weights then warn.
LOW_PRECISION_LR = 1e-5
# ModelConfig / GRPOConfig flags that are from_pretrained keywords, with their defaults (a flag left at its default
# does not override the same key in --model_init_kwargs)
# a model folder's own Python code runs only by the command line's flag, never by a config file's key
REMOTE_CODE_REFUSED = ("{where} may not set trust_remote_code: a model folder's own Python code runs only with "
                       "--trust-remote-code on the bupo train command line (read that code first)")
_MODEL_FLAG_DEFAULTS: dict[str, Any] = {"dtype": "float32", "attn_implementation": None, "revision": "main",
                                        "trust_remote_code": False}


def default_model_args() -> Any:
    """TRL's ``ModelConfig()``: the model flags of a run that gives none."""
    from trl import ModelConfig

    return ModelConfig()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def model_init_kwargs(train_args: Any, model_args: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords: ``--model_init_kwargs`` plus the ModelConfig/GRPOConfig flags
    (``--dtype``, ``--attn_implementation``, ``--model_revision``, ``--trust_remote_code``).

    A flag left at its default does not override the same key in ``--model_init_kwargs``; the two giving different
    values is an error. ``trust_remote_code`` comes from the command line's ``--trust-remote-code`` only (the YAML
    is refused at parse time, ``model_init_kwargs`` here). ``dtype`` defaults to ``float32`` (TRL's default): fp32 master weights, with ``bf16``/``fp16``
    as autocast.
    """
    kw = dict(train_args.model_init_kwargs or {})
    if kw.pop("trust_remote_code", False):
        raise ValueError(REMOTE_CODE_REFUSED.format(where="--model_init_kwargs"))
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
        import torch

        from bupo.engines import require_vllm

        cuda = torch.cuda.is_available()
        if train_args.vllm_mode == "server" and not cuda:
            raise ValueError("--vllm_mode server needs CUDA GPUs: TRL 1.16 sends the trained weights to the server "
                             "through vLLM's NCCL weight-transfer engine; without a GPU use --vllm_mode colocate (the "
                             "engine in this process)")
        if getattr(train_args, "vllm_enable_sleep_mode", False) and not cuda:
            raise ValueError("--vllm_enable_sleep_mode needs a CUDA GPU: vLLM's sleep mode frees GPU memory and is not "
                             "supported on a CPU; drop it")

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


def policy_model(model_path: str, train_args: Any, model_args: Any | None) -> Any:
    """The policy model with the ModelConfig / ``--model_init_kwargs`` keywords (fp32 master weights by default).

    Warns when the weights end up bf16/fp16 (asked for explicitly, or ``dtype: auto`` on a bf16 checkpoint) and
    the learning rate is below 1e-5, where most AdamW updates round away.
    """
    import torch

    from bupo.models import load_model as load_pretrained

    if model_args is None:
        from trl import ModelConfig

        model_args = ModelConfig()
    kw = model_init_kwargs(train_args, model_args)
    dtype = kw.pop("dtype")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_kbit_device_map, get_quantization_config

        kw.setdefault("quantization_config", get_quantization_config(model_args))
        kw.setdefault("device_map", get_kbit_device_map())
    # the trainer places the model (a quantised one has its device map); the tokenizer is built by the caller
    model, _ = load_pretrained(model_path, dtype=dtype, device=None, tokenizer=False, **kw)
    low = {p.dtype for p in model.parameters() if p.is_floating_point()} & {torch.bfloat16, torch.float16}
    if low and train_args.learning_rate < LOW_PRECISION_LR:
        logger.warning("the model's weights are %s (dtype %s) and learning_rate %.1e < %.0e: most AdamW updates of "
                       "low-precision weights round away; keep dtype float32 (the default) and use bf16: true for "
                       "mixed precision", "/".join(sorted(str(d).removeprefix("torch.") for d in low)), dtype,
                       train_args.learning_rate, LOW_PRECISION_LR)
    return model


def load_tokenizer(model_path: str, train_args: Any, model_args: Any) -> Any:
    """The model's tokenizer (:func:`bupo.models.load_tokenizer`: checked against the model's vocabulary, its chat
    template rendered once), left-padded and left-truncated, with the model's revision / trust_remote_code."""
    from bupo.models import load_tokenizer as load_checked

    kw = {k: v for k, v in model_init_kwargs(train_args, model_args).items() if k in ("revision", "trust_remote_code")}
    return load_checked(model_path, padding_side="left", truncation_side="left", **kw)


def peft_config(model_args: Any | None) -> Any:
    """TRL's ``get_peft_config``: a ``peft.LoraConfig`` from the ``--use_peft`` / ``--lora_*`` flags, or None."""
    if model_args is None or not model_args.use_peft:
        return None
    from trl import get_peft_config

    return get_peft_config(model_args)
