"""The recipe that builds the bundled tiny reasoning model from scratch (``bupo model build``).

Steps (all seeded; CPU, ``torch.set_num_threads(threads)``):
1. the tokenizer (``bupo.zoo.tokenizer``: characters + a few whole words, Qwen3 chat template);
2. a randomly initialised Qwen3 (``Qwen3ForCausalLM``) of ~1.6M parameters, 8 decoder layers, tied embeddings;
3. supervised training on *imperfect demonstrations* of the bundled arithmetic task: each solution step's
   result is replaced, with probability ``noise``, by a nearby wrong value that the rest of the chain then
   carries (as a real slip would). Loss on the assistant turn only. A fraction of the examples use the
   plain generation prompt (the model then writes the empty think block itself), the rest the Qwen3
   ``enable_thinking=False`` prompt, so both templates work;
4. held-out evaluation (pass@1 and pass@k at temperature 1.0), then ``save_pretrained`` of model,
   tokenizer and generation config (safetensors) and a model card (README.md) with the measured numbers.

The demonstration noise is the calibration lever: the model learns the task's procedure but also the
slip rate, so sampling at temperature 1.0 reproduces slips (pass@1 well below pass@k), and RL has a
clear signal to remove them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1


@dataclass
class RecipeConfig:
    """Everything that determines the built model. ``smoke=True`` shrinks it to a seconds-long run."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    noise: float = 0.2  # per-step probability that a demonstration step's result is wrong
    plain_prompt_frac: float = 0.25  # examples whose prompt lacks the empty think block
    difficulty: int | None = None  # None: the task's default mix
    # model
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # evaluation
    eval_problems: int = 200
    eval_samples: int = 8
    eval_seed: int = 1234
    max_new_tokens: int = 96
    # 1 thread: the shipped weights were built so, and it is robust on a shared CPU (a short check with 2
    # threads gave identical weights; on an idle 2-core machine 2 threads are somewhat faster)
    threads: int = 1
    log_every: int = 50
    smoke: bool = False

    def __post_init__(self) -> None:
        # named by their `bupo model build` flags where they have one (the CLI passes them straight through)
        for name, flag in (("steps", "--steps"), ("batch_size", "batch_size"), ("threads", "--threads")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if not 0.0 <= self.plain_prompt_frac <= 1.0:
            raise ValueError(f"plain_prompt_frac must be in [0, 1], got {self.plain_prompt_frac}")

    @classmethod
    def smoke_config(cls, seed: int = 0) -> RecipeConfig:
        return cls(
            seed=seed, steps=4, batch_size=8, warmup_steps=2, eval_problems=4, eval_samples=2,
            max_new_tokens=24, smoke=True,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# demonstrations

# a slip: off by one or two in the last digit, or by ten (a carry/borrow mistake)
_SLIPS = (-10, -2, -1, 1, 2, 10)


def noisy_solution(steps: list[tuple[int, str, int, int]], noise: float, rng: random.Random) -> str:
    """The step-by-step solution with slips: each step's result is wrong with probability ``noise``.

    A slip moves the result by a small nonzero amount (never below 0); later steps start from the
    wrong value, so the boxed answer is wrong too.
    """
    from bupo.data.task import _apply, format_solution

    out = []
    cur = steps[0][0]
    for _, op, b, _ in steps:
        res = _apply(cur, op, b)
        if noise > 0 and rng.random() < noise:
            delta = rng.choice(_SLIPS)
            res = res + delta if res + delta >= 0 else res - delta
        out.append((cur, op, b, res))
        cur = res
    return format_solution(out)


def _encode_example(tokenizer: Any, row: dict, solution: str, plain: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = -100 on the prompt."""
    from bupo.zoo.tokenizer import EMPTY_THINK

    if plain:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        target = EMPTY_THINK + solution
    else:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        target = solution
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids


class _Stream:
    """An endless, seeded stream of noisy training examples (train split; chunks of 4096 distinct problems)."""

    def __init__(self, tokenizer: Any, cfg: RecipeConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.rng = random.Random(f"bupo-recipe:{cfg.seed}:noise")
        self.chunk = 0
        self.buffer: list[dict] = []

    def _refill(self) -> None:
        from bupo.data.task import generate_problems, to_row

        # chunks of distinct problems, each chunk its own generation seed (problems may recur across chunks)
        probs = generate_problems(
            "train", 4096, seed=self.cfg.seed * 100003 + self.chunk, difficulty=self.cfg.difficulty
        )
        self.chunk += 1
        self.buffer = [(to_row(p, "train", i), p) for i, p in enumerate(probs)]
        self.buffer.reverse()

    def batch(self, n: int) -> tuple[Any, Any]:
        """``(input_ids, labels)``, right-padded; no attention mask (see :func:`_train`)."""
        import torch

        ids, labels = [], []
        for _ in range(n):
            if not self.buffer:
                self._refill()
            row, prob = self.buffer.pop()
            sol = noisy_solution(prob.steps(), self.cfg.noise, self.rng)
            plain = self.rng.random() < self.cfg.plain_prompt_frac
            i, lab = _encode_example(self.tok, row, sol, plain)
            ids.append(i)
            labels.append(lab)
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        lab_t = torch.full((n, width), -100, dtype=torch.long)
        for j, (i, lab) in enumerate(zip(ids, labels, strict=True)):
            input_ids[j, : len(i)] = torch.tensor(i)
            lab_t[j, : len(lab)] = torch.tensor(lab)
        return input_ids, lab_t


# ---------------------------------------------------------------------------------------------------
# model


def build_config(tokenizer: Any, cfg: RecipeConfig) -> Any:
    from transformers import Qwen3Config

    from bupo.zoo.tokenizer import IM_END
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def generation_config(tokenizer: Any, max_new_tokens: int = 96) -> Any:
    from transformers import GenerationConfig

    from bupo.zoo.tokenizer import IM_END, PAD_TOKEN

    eos = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, PAD_TOKEN)]
    # plain temperature-1.0 sampling from the full distribution (top_k=0 turns HF's default top-50 off)
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip


def _lr_at(step: int, cfg: RecipeConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ---------------------------------------------------------------------------------------------------
# evaluation: bupo.evaluation's stages (plan, generate and score, aggregate), in memory


def _heldout_position(name: str, problem: int) -> int:
    # the card's numbers were sampled with each problem's seeds keyed by its position alone
    return problem


def evaluate(
    model: Any, tokenizer: Any, rows: list[dict], n_samples: int, seed: int, max_new_tokens: int = 96,
    temperature: float = 1.0, ks: tuple[int, ...] = (1, 8), batch_size: int = 256,
    template: str = "qwen3_no_thinking",
) -> dict[str, Any]:  # fmt: skip
    """Held-out pass@k (unbiased estimator over ``n_samples`` samples per problem, ``boxed_exact`` reward), with
    :mod:`bupo.evaluation`'s planning, generation + scoring and aggregation; nothing is written to disk.

    Sample ``j`` of problem ``i`` is seeded ``sample_seed(seed, i, j)`` (``bupo.evaluation.evaluate`` keys by
    benchmark and problem instead), so the numbers in the bundled model's ``recipe.json`` and
    ``grpo_proof.json`` reproduce. Pass@k is reported for the ``ks`` up to ``n_samples``; temperature 0 = greedy.
    """
    from bupo.evaluation.backends import HFBackend, SamplingSettings
    from bupo.evaluation.core import generate_and_score, make_scorer
    from bupo.evaluation.plan import plan_benchmarks, plan_samples
    from bupo.evaluation.results import aggregate

    plan = plan_benchmarks({"heldout": rows}, n_samples, [k for k in ks if k <= n_samples])
    work = plan_samples(plan, tokenizer, template, seed=seed, gen_hash="", reward="boxed_exact", stored={},
                        prompt_key=_heldout_position)  # fmt: skip
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    generate_and_score(backend, settings, work, make_scorer("boxed_exact"))
    result = aggregate(plan, work.records, work.reused)["heldout"]
    texts = [work.records[("heldout", i, j)]["response"] for i in range(len(rows)) for j in range(n_samples)]
    res: dict[str, Any] = {"problems": len(rows), "samples_per_problem": n_samples, "temperature": temperature}
    res.update({f"pass@{k}": v for k, v in result.pass_at_k.items()})
    res["mean_completion_chars"] = sum(len(c) for c in texts) / max(1, len(texts))
    res["example_completion"] = texts[0] if texts else ""
    return res


# ---------------------------------------------------------------------------------------------------
# the recipe


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)``; the previous setting is restored afterwards."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def train(cfg: RecipeConfig, log: Any = print) -> tuple[Any, Any, dict[str, Any]]:
    """Build tokenizer + model and train them. Returns ``(model, tokenizer, train_stats)``."""
    with torch_threads(cfg.threads):
        return _train(cfg, log)


def _train(cfg: RecipeConfig, log: Any) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`train` under the caller's thread setting."""
    import torch
    from transformers import Qwen3ForCausalLM

    from bupo.zoo.tokenizer import build_tokenizer

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = Qwen3ForCausalLM(build_config(tok, cfg))
    model.generation_config = generation_config(tok, cfg.max_new_tokens)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )  # fmt: skip
    stream = _Stream(tok, cfg)
    t0 = time.perf_counter()
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        input_ids, labels = stream.batch(cfg.batch_size)
        # right padding + causal attention: real tokens never see the pads, so no mask is needed (faster sdpa path)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            log(f"step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {_lr_at(step, cfg):.2e} {time.perf_counter() - t0:.0f}s")  # fmt: skip
    model.eval()
    stats = {
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "examples_seen": cfg.steps * cfg.batch_size,
    }
    return model, tok, stats


def check_build_out(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """ValueError (one line) when ``out_dir`` holds anything but an earlier build and ``overwrite`` is off; an earlier
    build (``recipe.json``) is replaced only with ``overwrite``. Checked before the recipe trains."""
    out = Path(out_dir)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    built = (out / "recipe.json").is_file()
    if not overwrite:
        what = "an earlier build" if built else "files this build did not make"
        raise ValueError(f"--out {str(out)!r} already exists and holds {what}; choose a new folder, or pass "
                         "--overwrite to replace it")
    if not built:  # a file, or a folder the recipe did not write
        raise ValueError(f"--out {str(out)!r} is not a model folder built by the recipe (no recipe.json); "
                         "--overwrite replaces only an earlier build: choose a new folder")


def build(out_dir: str | os.PathLike, cfg: RecipeConfig, log: Any = print, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the recipe and write the model folder atomically to ``out_dir``. Returns the record. An existing
    non-empty ``out_dir`` is refused before training (:func:`check_build_out`), an earlier build replaced only with
    ``overwrite``."""
    import torch
    import transformers

    from bupo.data.task import make_examples

    check_build_out(out_dir, overwrite)
    out = Path(out_dir)
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        model, tok, stats = _train(cfg, log)
        rows = make_examples("test", cfg.eval_problems, seed=cfg.eval_seed)
        t1 = time.perf_counter()
        ev = evaluate(
            model, tok, rows, cfg.eval_samples, cfg.eval_seed, cfg.max_new_tokens, 1.0, (1, cfg.eval_samples)
        )
        greedy = evaluate(model, tok, rows, 1, cfg.eval_seed, cfg.max_new_tokens, 0.0, (1,))
        eval_seconds = time.perf_counter() - t1
    record = {
        "recipe_version": RECIPE_VERSION,
        "config": asdict(cfg),
        "train": stats,
        "eval_heldout_t1": {k: v for k, v in ev.items() if k != "example_completion"},
        "eval_heldout_greedy_pass@1": greedy["pass@1"],
        "example_completion": ev["example_completion"],
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    log(json.dumps({k: record[k] for k in ("train", "eval_heldout_t1", "eval_heldout_greedy_pass@1")}))
    from bupo.io import temp_folder  # removed at the end; one a kill -9 left behind goes on the next build

    with temp_folder(out.parent, out.name) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(tmp / "recipe.json", "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        from bupo.zoo.card import write_card

        write_card(tmp, record)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # the model folder is ordinary shared data
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return record
