"""The model card (``README.md``) of a trained run: what TRL's checkpoints and ``push_to_hub`` write and upload.

TRL's own card names no base model for a local folder ("fine-tuned version of [None]") and says "trained with
GRPO". :meth:`BuPOTrainer.create_model_card` calls :func:`write_model_card` instead, which records the base model,
the BuPO settings (k as the paper's layer and 0-based, s_inter in rollout steps, projection, template, reward),
the in-training evaluations, the versions and the paper's citation. A GRPO run (``internal_steps = 0``) gets the
same card without the BuPO part.

Run facts the trainer cannot know (template, data, where k came from) are read from ``trainer.bupo_run`` (the
summary dict ``bupo train`` builds) or, failing that, ``<output_dir>/bupo_run.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BUPO_CITATION", "build_model_card", "write_model_card"]

PAPER_TITLE = "Bottom-up Policy Optimization: Your Language Model Policy Secretly Contains Internal Policies"
PAPER_ID = "2512.19673"
BUPO_CITATION = """\
@article{bupo2025,
  title   = {Bottom-up Policy Optimization: Your Language Model Policy Secretly Contains Internal Policies},
  author  = {Tan and Wang and He and Liao and Zhao and Lu and Liang and Zhao and Liu},
  journal = {arXiv preprint arXiv:2512.19673},
  year    = {2025},
  url     = {https://arxiv.org/abs/2512.19673}
}"""
TRL_CITATION = """\
@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""


def _run_info(trainer: Any) -> dict[str, Any]:
    info = getattr(trainer, "bupo_run", None)
    if isinstance(info, dict):
        return info
    path = Path(trainer.args.output_dir) / "bupo_run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _base_model(trainer: Any, info: dict[str, Any]) -> tuple[str, str | None]:
    """(how the card names the base model, the Hub id for the card's ``base_model`` metadata or None)."""
    name = info.get("model") or getattr(trainer.model.config, "_name_or_path", "") or ""
    name = str(name)
    if not name:
        return "(not recorded)", None
    if not os.path.isdir(name):
        return name, name  # a Hub id
    from bupo.zoo import DEFAULT_MODEL

    if Path(name).resolve() == Path(DEFAULT_MODEL).resolve():
        return "bupo's bundled tiny_reasoner (1.6M-parameter Qwen3; `bupo model info`)", None
    return f"the local folder `{Path(name).name}`", None


def _eval_rows(trainer: Any) -> tuple[list[str], list[list[str]]]:
    """The in-training evaluations from the trainer's log history: one row per evaluation, % with 2 decimals."""
    n_per = max(int(getattr(trainer.args, "optimizer_steps_per_rollout", 1) or 1), 1)
    evals = [h for h in trainer.state.log_history if "eval/avg" in h]
    cols: list[str] = []
    for h in evals:
        for key in h:
            if key.startswith("eval/") and (key.rsplit("/", 1)[-1].startswith(("avg@", "pass@"))) and key not in cols:
                cols.append(key)
    header = ["rollout step", "optimizer step", *(c.removeprefix("eval/") for c in cols), "Avg"]
    rows = []
    for h in evals:
        step = int(h.get("step", 0))
        cells = [f"{100 * h[c]:.2f}" if isinstance(h.get(c), int | float) else "" for c in cols]
        rows.append([str(step // n_per), str(step), *cells, f"{100 * h['eval/avg']:.2f}"])
    return header, rows


def _card_versions() -> list[tuple[str, str]]:
    from bupo.provenance import versions

    return list(versions(("bupo", "trl", "transformers", "torch", "accelerate", "datasets", "tokenizers")).items())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_model_card(trainer: Any, model_name: str | None = None, dataset_name: str | None = None,
                     tags: str | list[str] | None = None) -> Any:
    """A :class:`huggingface_hub.ModelCard` for ``trainer``'s run (BuPO if ``internal_steps > 0``, else GRPO)."""
    from huggingface_hub import ModelCard, ModelCardData

    args = trainer.args
    info = _run_info(trainer)
    bupo = int(getattr(args, "internal_steps", 0) or 0) > 0
    algo = "BuPO" if bupo else "GRPO"
    model_name = model_name or Path(args.output_dir).name
    base_text, base_id = _base_model(trainer, info)
    tag_set = {tags} if isinstance(tags, str) else set(tags or ())
    tag_set.update({"trl", "grpo", "generated_from_trainer"} | ({"bupo"} if bupo else set()))
    data = dataset_name or info.get("data")
    if data and os.path.exists(str(data)):
        data = f"`{Path(str(data)).name}`"  # a local file: its name, not this machine's absolute path
    reward = info.get("reward") or ",".join(getattr(trainer, "reward_func_names", []) or []) or "(not recorded)"
    k = getattr(args, "internal_layer", None)
    k = k if isinstance(k, int) else info.get("internal_layer")
    n_per = int(getattr(args, "optimizer_steps_per_rollout", 1) or 1)

    lines = [f"# {model_name}", ""]
    lines.append(f"A fine-tuned version of {base_text if base_id is None else f'[{base_id}](https://huggingface.co/{base_id})'}, "
                 f"trained with **{algo}**" + (f" (Bottom-up Policy Optimization, [arXiv {PAPER_ID}]"
                                               f"(https://arxiv.org/abs/{PAPER_ID}))" if bupo else "")
                 + " by bupo on [TRL](https://github.com/huggingface/trl)'s "
                 "`GRPOTrainer`.")
    lines.append("")
    if bupo:
        lines += [
            "## BuPO settings", "",
            "BuPO first optimises the internal layer policy π^k = softmax(lm_head(H^k)) for s_inter rollout steps, "
            "then the full policy with GRPO.", "",
            _table(["setting", "value"], [
                ["internal layer", "(not recorded)" if k is None else f"paper layer {k + 1} (0-based k = {k})"],
                ["where k came from", str(info.get("internal_layer_source", "(not recorded)"))],
                ["s_inter (internal phase)", f"{args.internal_steps} rollout steps = optimizer steps 1..."
                                              f"{args.internal_steps * n_per} ({n_per} optimizer steps per rollout)"],
                ["projection", f"`{getattr(args, 'internal_projection', 'raw')}` "
                               "(raw = lm_head(H^k), no final norm, the paper's; final_norm = the logit lens)"],
            ]), "",
        ]
    elif k is not None:
        lines += [f"GRPO on the full policy; the entropy of π^k was logged for paper layer {k + 1} (0-based k = {k}).", ""]
    lines += ["## Training", "", _table(["setting", "value"], [
        ["algorithm", algo],
        ["base model", base_text if base_id is None else base_id],
        ["data", str(data or "(not recorded)")],
        ["prompt template", str(info.get("template", "(not recorded)"))],
        ["reward", str(reward)],
        ["optimizer steps", str(trainer.state.global_step) + (f" of {args.max_steps}" if args.max_steps > 0 else "")],
        ["completions per prompt", str(args.num_generations)],
        ["learning rate", f"{args.learning_rate:g}"],
        ["KL coefficient β", f"{args.beta:g}"],
        ["loss type", str(args.loss_type)],
        ["seed", str(args.seed)],
    ]), ""]
    header, rows = _eval_rows(trainer)
    lines += ["## In-training evaluation", ""]
    if rows:
        lines += ["Avg@n and unbiased Pass@k in %, on held-out problems (`bupo eval` layout):", "",
                  _table(header, rows), ""]
    else:
        lines += ["No evaluation ran during training.", ""]
    lines += ["## Framework versions", "", *(f"- {d}: {v}" for d, v in _card_versions()), ""]
    grpo_citation = (getattr(trainer, "_paper", None) or {}).get("citation")  # TRL's GRPO (DeepSeekMath) entry
    lines += ["## Citation", ""]
    if bupo:
        lines += ["BuPO:", "", "```bibtex", BUPO_CITATION, "```", ""]
    if grpo_citation:
        lines += ["GRPO:", "", "```bibtex", grpo_citation.strip(), "```", ""]
    lines += ["TRL:", "", "```bibtex", TRL_CITATION, "```", ""]
    card_data = ModelCardData(base_model=base_id, library_name="transformers", model_name=model_name,
                              pipeline_tag="text-generation", tags=sorted(tag_set),
                              datasets=[dataset_name] if dataset_name else None)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(trainer: Any, model_name: str | None = None, dataset_name: str | None = None,
                     tags: str | list[str] | None = None) -> Path | None:
    """Write ``<output_dir>/README.md`` (main process only; others return None)."""
    if not trainer.is_world_process_zero():
        return None
    from bupo.io import atomic_write_text

    path = Path(trainer.args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, str(build_model_card(trainer, model_name, dataset_name, tags)))
    return path
