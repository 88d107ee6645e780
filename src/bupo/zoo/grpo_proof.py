"""Proof that RL can improve the bundled model: a short plain-TRL GRPO run, held-out pass@1 before/after.

``bupo model grpo-proof`` (or ``python -m bupo.zoo.grpo_proof``): loads the model (default: the bundled
one), measures held-out pass@1/pass@k at temperature 1.0, trains with TRL's ``GRPOTrainer`` on the task's
train split with the ``boxed_exact`` reward for a fixed number of steps (CPU, fp32), measures again, and
writes the numbers to a JSON file (``--out``; ``--write-card`` also stores them in the model folder and
re-renders its card). The trained weights are discarded unless ``--save-dir`` is given.

The step count is fixed (not a time budget) so that the run is reproducible; ``--max-seconds`` only guards
against a very slow machine (the run stops early and the result records it).

Why TRL's ``GRPOTrainer`` itself and not ``bupo train``'s ``BuPOTrainer``: the proof is a claim about the model
(stock GRPO improves it), recorded in its card, so it deliberately runs the unmodified reference algorithm,
independent of bupo's trainer (whose ``internal_steps=0`` equivalence to GRPO is tested on its own). The
evaluation before and after is the shared one (:func:`bupo.zoo.recipe.evaluate`, bupo.evaluation's stages), the
reward is ``bupo.rewards.make_reward_func("boxed_exact")``, as ``bupo train`` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

PROOF_DEFAULTS: dict[str, Any] = {
    "max_steps": 60,
    "prompts_per_step": 8,
    "num_generations": 8,
    "learning_rate": 2e-4,
    "loss_type": "dapo",
    "max_completion_length": 64,
    "seed": 0,
    "train_problems": 2048,
    "eval_problems": 200,
    "eval_samples": 8,
    "eval_seed": 1234,
    "threads": 1,
    "max_seconds": 300.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PROOF_DEFAULTS
    p.add_argument("--model", default=None, help="a bupo name, folder or Hub id (default: tiny, the bundled model)")
    p.add_argument("--out", default=None, help="write the result JSON here (default: print only)")
    p.add_argument("--write-card", action="store_true", help="store the result in the model folder + card")
    p.add_argument("--save-dir", default=None, help="save the GRPO-trained model here")
    for key in ("max_steps", "prompts_per_step", "num_generations", "max_completion_length", "seed",
                "eval_samples", "eval_seed", "threads"):  # fmt: skip
        p.add_argument("--" + key.replace("_", "-"), type=int, default=d[key])
    # the shared row-limit vocabulary (docs/cli.md); the old names stay as aliases
    p.add_argument("--train-limit", "--train-problems", dest="train_problems", type=int, default=d["train_problems"],
                   metavar="N", help=f"bundled-task training problems (default {d['train_problems']})")
    p.add_argument("--eval-limit", "--eval-problems", dest="eval_problems", type=int, default=d["eval_problems"],
                   metavar="N", help=f"held-out problems evaluated (default {d['eval_problems']})")
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    p.add_argument("--loss-type", default=d["loss_type"])
    p.add_argument(
        "--max-seconds", type=float, default=d["max_seconds"], help="stop training early after this"
    )
    p.add_argument("--machine-note", default="2-core CPU", help="free text stored with the timing")


def _check(cfg: dict[str, Any]) -> None:
    for key in ("max_steps", "prompts_per_step", "num_generations", "max_completion_length", "train_problems",
                "eval_problems", "eval_samples", "threads"):  # fmt: skip
        if int(cfg[key]) < 1:
            flag = {"train_problems": "--train-limit", "eval_problems": "--eval-limit"}.get(key, "--" + key.replace("_", "-"))
            raise ValueError(f"{flag} must be >= 1, got {cfg[key]}")
    if cfg["num_generations"] < 2:
        raise ValueError(f"--num-generations must be >= 2 (GRPO needs a group), got {cfg['num_generations']}")
    if not cfg["learning_rate"] > 0:
        raise ValueError(f"--learning-rate must be > 0, got {cfg['learning_rate']}")


def run(model_dir: str | os.PathLike | None = None, save_dir: str | None = None, machine_note: str = "",
        log: Any = print, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Run the proof; returns ``{"before", "after", "train_seconds", "config", ...}``."""
    cfg = {**PROOF_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(cfg) - set(PROOF_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown proof settings {sorted(unknown)}; accepted: {sorted(PROOF_DEFAULTS)}")
    _check(cfg)
    from bupo.zoo.recipe import torch_threads

    with torch_threads(int(cfg["threads"])):
        return _run(cfg, model_dir, save_dir, machine_note, log)


def _grpo_config(cfg: dict[str, Any], workdir: str) -> Any:
    """TRL's GRPOConfig of the proof: CPU fp32, one optimizer step per generation batch of ``prompts_per_step``
    prompts x ``num_generations``, T=1.0, no KL (beta 0), a constant learning rate, nothing saved."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=workdir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=cfg["prompts_per_step"] * cfg["num_generations"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_completion_length"],
        temperature=1.0,
        top_p=1.0,
        chat_template_kwargs={"enable_thinking": False},
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type=cfg["loss_type"],
        max_steps=cfg["max_steps"],
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _guard(max_seconds: float, log: Any) -> Any:
    """A TrainerCallback that logs the reward and stops training after ``max_seconds`` (``.stopped_early``)."""
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.stopped_early = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if time.perf_counter() - self.t0 > max_seconds:
                self.stopped_early = True
                control.should_training_stop = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> Any:
            if logs and "reward" in logs:
                log(
                    f"  step {state.global_step}: reward {logs['reward']:.3f} ({time.perf_counter() - self.t0:.0f}s)"
                )
            return control

    return _Guard()


def _train_dataset(cfg: dict[str, Any]) -> Any:
    """The task's train split as TRL's conversational prompts with a ``ground_truth`` column."""
    from datasets import Dataset

    from bupo.data.task import make_examples

    rows = make_examples("train", cfg["train_problems"], seed=cfg["seed"] + 777)
    return Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]} for r in rows]
    )


def _run(
    cfg: dict[str, Any], model_dir: Any, save_dir: str | None, machine_note: str, log: Any
) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from trl import GRPOTrainer

    from bupo.data.task import make_examples
    from bupo.models import load_model, resolve_model
    from bupo.rewards import make_reward_func
    from bupo.zoo.recipe import evaluate

    model_dir = resolve_model(model_dir)  # same names, folders and one-line errors as every --model
    model, tok = load_model(model_dir, dtype="float32", device="cpu", local_files_only=True)
    test_rows = make_examples("test", cfg["eval_problems"], seed=cfg["eval_seed"])
    ks = (1, cfg["eval_samples"])

    def _eval(tag: str) -> dict[str, Any]:
        t = time.perf_counter()
        res = evaluate(model, tok, test_rows, cfg["eval_samples"], cfg["eval_seed"], 96, 1.0, ks)
        res.pop("example_completion", None)
        log(f"{tag}: pass@1 {res['pass@1']:.3f} pass@{ks[1]} {res[f'pass@{ks[1]}']:.3f} "
            f"({time.perf_counter() - t:.0f}s)")  # fmt: skip
        return res

    before = _eval("before")
    dataset = _train_dataset(cfg)
    workdir = tempfile.mkdtemp(prefix="bupo-grpo-proof-")
    args = _grpo_config(cfg, workdir)
    try:
        guard = _guard(cfg["max_seconds"], log)
        trainer = GRPOTrainer(model=model, reward_funcs=[make_reward_func("boxed_exact")], args=args,
                              train_dataset=dataset, processing_class=tok, callbacks=[guard])  # fmt: skip
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        model = trainer.model
        model.eval()
        after = _eval("after")
        if save_dir:
            trainer.save_model(save_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "model": model_dir,
        "config": cfg,
        "before": before,
        "after": after,
        "pass@1_gain_points": round(100 * (after["pass@1"] - before["pass@1"]), 2),
        "train_seconds": round(train_seconds, 1),
        "steps_done": trainer.state.global_step,
        "stopped_early": guard.stopped_early,
        "threads": cfg["threads"],
        "machine_note": machine_note,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    keys = [k for k in PROOF_DEFAULTS if hasattr(args, k)]
    result = run(args.model, save_dir=args.save_dir, machine_note=args.machine_note,
                 log=lambda s: print(s, flush=True), **{k: getattr(args, k) for k in keys})  # fmt: skip
    from bupo.io import atomic_write_json

    if args.out:
        atomic_write_json(args.out, result, sort_keys=True)
    if args.write_card:
        from bupo.zoo.card import write_card

        folder = Path(result["model"])
        atomic_write_json(folder / "grpo_proof.json", result, sort_keys=True)
        write_card(folder, proof=result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bupo.zoo.grpo_proof", description=__doc__.splitlines()[0])
    add_arguments(p)
    result = run_from_args(p.parse_args(argv))
    print(
        json.dumps(
            {k: result[k] for k in ("before", "after", "pass@1_gain_points", "train_seconds")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
