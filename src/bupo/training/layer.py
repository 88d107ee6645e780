"""The run's internal layer k (0-based, paper layer k+1): given, or ``auto`` from an analysis; and the pre-flight
check that pi^k is readable before the first rollout. Every forward here runs under :func:`full_params`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bupo.training.gather import full_params

logger = logging.getLogger(__name__)


def config_num_layers(model_path: str) -> int | None:
    """The decoder layer count L from the model's ``config.json`` (no weights read); None when it cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        return int(config.get_text_config().num_hidden_layers)
    except Exception:  # a format AutoConfig cannot read: the check after loading (check_internal_policy) covers it
        return None


def check_layers(config: Any, num_layers: int | None) -> None:
    """Every layer the run names (``internal_layer``, each layer of ``internal_schedule``) is one of the model's
    ``num_layers``: ValueError (one line, the valid range 0..L-1) before anything is loaded; None: not known yet."""
    from bupo.internal.policy import check_layer
    from bupo.training.switch import parse_schedule

    if num_layers is None:
        return
    if config.internal_schedule:
        named = [("--internal-schedule", k) for k, _ in parse_schedule(config.internal_schedule)]
    else:
        named = [("--internal-layer", config.internal_layer)] if isinstance(config.internal_layer, int) else []
    for flag, k in named:
        try:
            check_layer(k, num_layers)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None


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
    from bupo.analysis.result import suggested_layer

    given = analysis or find_analysis(model_path, output_dir)
    if given is not None:
        check_analysis_model(given, model, model_path)
        return suggested_layer(given, projection=projection), f"analysis {given}"
    # no analysis yet: run a short one (the paper: 0.44% of the training cost) and keep it next to the run
    from bupo.analysis.run import analyze

    out = Path(output_dir) / "analysis"
    if is_main and device is not None:
        model.to(device)  # the trainer would move it there anyway
    with full_params(model):  # every process gathers; the main one analyses
        if is_main:
            _refuse_degenerate(model, tokenizer, rows, template, projection)
            logger.info("--internal-layer auto: no analysis found, analysing %d responses into %s", samples, out)
            # analyze runs in eval mode and restores every module's training flag itself
            analyze(model, tokenizer, data=rows[:samples], out_dir=out, max_samples=samples,
                    max_new_tokens=max_new_tokens, template=template, figures=False, projection=projection,
                    progress=True)  # minutes on a real model: show it
    _barrier()
    return suggested_layer(out, projection=projection), f"analysis {out} (run by bupo train, {samples} responses)"


def check_analysis_model(analysis: str | Path, model: Any, model_path: str | None) -> None:
    """An analysis is reused only for the model it measured: ValueError (one line) when its summary's model type,
    layer count or vocabulary differ from ``model``'s (its layer k would name another network's layer)."""
    from bupo.analysis.result import load_summary
    from bupo.provenance import identity_mismatch, model_identity

    summary = load_summary(analysis)
    current = model_identity(model, model_path)
    diff = identity_mismatch(summary, current)
    if diff:
        raise ValueError(f"the analysis at {str(analysis)!r} was made on another model ({summary.get('model')!r}, "
                         f"{summary.get('num_layers')} layers) than {current['model']!r} ({current['num_layers']} "
                         f"layers): {diff}; analyse this model (bupo analyze --model ...) or give --internal-layer K")


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


def last_layer_raw_warning(layer: int, num_layers: int, projection: str) -> str | None:
    """The warning for k = L-1 under projection raw (None otherwise): that pi^k is the last layer's residual put
    through lm_head WITHOUT the final norm, which is not the model's own policy (the model, and the official code's
    ``hidden_states[L]``, are normed)."""
    if projection != "raw" or layer != num_layers - 1:
        return None
    return (f"internal layer k = {layer} = L-1 with projection raw: pi^k is the last layer's residual without the "
            "final norm, NOT the model's own policy (the model and the official code's hidden_states[L] apply the "
            "norm); its log-probs can sit hundreds of nats below the model's (the loss clamps log-ratios at +-20). "
            "For the model's own policy use --internal_projection final_norm (the internal phase is then GRPO), "
            f"or a layer below {layer}")


def check_internal_policy(model: Any, tokenizer: Any, rows: list[dict], template: str, layer: int,
                          projection: str) -> dict[str, Any] | None:
    """Before any training step: is pi^layer readable? Logs a warning with the numbers when it is not, and one for
    k = L-1 under projection raw (:func:`last_layer_raw_warning`)."""
    from bupo.analysis.health import check_layer as layer_warning
    from bupo.analysis.health import quick_health
    from bupo.internal import parts
    from bupo.internal.policy import check_layer

    check_layer(layer, parts(model).num_layers)  # before any forward: one line naming 0..L-1, never an IndexError
    last = last_layer_raw_warning(layer, parts(model).num_layers, projection)
    if last:
        logger.warning("%s", last)
    prompts = [] if tokenizer is None else _check_prompts(tokenizer, rows, template)
    if not prompts:
        return None
    with full_params(model):
        health = quick_health(model, tokenizer, prompts, projection=projection)
    warning = layer_warning(health, layer)
    if warning:
        logger.warning("degenerate internal policy: %s", warning)
    L = len(health["layer_entropy"])
    return {"layer": layer, "projection": projection, "degenerate": bool(warning), "warning": warning,
            "entropy": health["layer_entropy"][layer], "final_entropy": health["final_entropy"],
            "top1_agreement": health["layer_top1_agreement"][layer], "resid_rms": (health["resid_rms"] or [None] * L)[layer],
            "measured_on": health["measured_on"], "last_layer_raw": last}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
