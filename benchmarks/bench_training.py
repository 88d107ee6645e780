"""Optimizer-step time of BuPO's internal phase vs the full phase (not a test).

For k in {L/6, L/2, L-2} (0-based; at least 1), one fixed rollout batch (generated once by the full model) is trained on with
BuPOTrainer's own loss (``compute_loss``), backward, gradient clipping and AdamW step, alternating internal and full
steps so both see the same machine load; the median of ``--reps`` steps each is reported. Generation is excluded:
it is identical in both phases (rollouts always come from the full model).

Goal (issue): time(internal k) / time(full) <= (k + 1) / L + 0.10.

    python benchmarks/bench_training.py                      # the bundled model
    python benchmarks/bench_training.py --random-init        # the bundled architecture, random weights
    python benchmarks/bench_training.py --model DIR --completion-length 256 --batch 16 --out bench.json
    # SmolLM2-135M-Instruct (L = 30: k = 5, 15, 28), both internal projections in one run
    python benchmarks/bench_training.py --model DIR --projection raw final_norm --batch 4 --completion-length 32

``--projection`` takes one or more of raw (the paper's lm_head(h)) and final_norm (lm_head(final_norm(h))); each k
is timed for each projection against the same full steps, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _model_and_tokenizer(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.random_init:
        from bupo.zoo.recipe import RecipeConfig, build_config
        from bupo.zoo.tokenizer import build_tokenizer

        tok = build_tokenizer()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(tok, RecipeConfig()))
        return model, tok, "bundled architecture, random init"
    path = args.model
    if path is None:
        from bupo.zoo import bundled_model_path

        path = str(bundled_model_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model, tok, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--random-init", action="store_true", help="bundled architecture with random weights")
    ap.add_argument("--batch", type=int, default=16, help="completions per optimizer step")
    ap.add_argument("--completion-length", type=int, default=96)
    ap.add_argument("--reps", type=int, default=12, help="timed steps per (k, phase)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="*", help="k values (default: L/6, L/2, L-2, each at least 1)")
    ap.add_argument("--projection", nargs="+", default=["raw"], choices=["raw", "final_norm"],
                    help="internal projection(s) timed (default raw)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bupo.data.task import make_examples
    from bupo.evaluation import resolve_template
    from bupo.training.config import BuPOConfig
    from bupo.training.data import build_prompt_dataset
    from bupo.training.trainer import BuPOTrainer

    model, tok, source = _model_and_tokenizer(args)
    L = model.config.num_hidden_layers
    ks = args.layers or sorted({max(1, L // 6), L // 2, L - 2})
    template = resolve_template(tok, "auto")
    ds = build_prompt_dataset(make_examples("train", 64, 0), tok, template)
    n_gen = 8
    cfg = BuPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=args.batch, num_generations=n_gen, max_completion_length=args.completion_length,
        learning_rate=1e-6, internal_layer=ks[0], internal_steps=1, max_steps=1, probe_every=0,
        log_policy_entropies=False, disable_tqdm=True,
        # force full-length completions so both phases see the same, known token count
        generation_kwargs={"min_new_tokens": args.completion_length},
    )
    tr = BuPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(i % 2) for i in range(len(completions))],
                     args=cfg, train_dataset=ds, processing_class=tok)
    tr.model.train()
    inputs = tr._generate_and_score_completions([ds[i] for i in range(args.batch)])
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive the steps ourselves
    opt = tr.create_optimizer()
    params = [p for p in tr.model.parameters() if p.requires_grad]

    def step(internal: bool, k: int, projection: str = "raw") -> tuple[float, float]:
        tr._bupo_internal, tr._bupo_layer = internal, k
        tr.args.internal_projection = projection
        c0, t0 = time.process_time(), time.perf_counter()
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    tokens = int(inputs["completion_mask"].sum())
    rows = []
    for k in ks:
        for _ in range(args.warmup):
            step(False, k)
            for proj in args.projection:
                step(True, k, proj)
        t_int: dict[str, list] = {p: [] for p in args.projection}
        t_full = []
        for _ in range(args.reps):  # interleave so every phase shares the same background load
            t_full.append(step(False, k))
            for proj in args.projection:
                t_int[proj].append(step(True, k, proj))
        mf, cf = (statistics.median(t[i] for t in t_full) for i in (0, 1))
        goal = (k + 1) / L + 0.10
        for proj in args.projection:
            mi, ci = (statistics.median(t[i] for t in t_int[proj]) for i in (0, 1))
            rows.append({"k": k, "paper_layer": k + 1, "projection": proj, "internal_s": mi, "full_s": mf,
                         "ratio": mi / mf, "internal_cpu_s": ci, "full_cpu_s": cf, "cpu_ratio": ci / cf,
                         "ideal": (k + 1) / L, "goal": goal, "meets_goal": mi / mf <= goal})
    result = {
        "model": source, "num_layers": L, "params": sum(p.numel() for p in params), "batch": args.batch,
        "prompt_tokens": int(inputs["prompt_mask"].shape[1]), "completion_tokens_per_seq": args.completion_length,
        "completion_tokens": tokens, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
        "rows": rows,
    }
    print(f"model: {source}; L={L}, {result['params'] / 1e6:.2f}M params; batch {args.batch} x "
          f"({result['prompt_tokens']} prompt + {args.completion_length} completion) tokens; "
          f"{args.threads} threads; median of {args.reps}")
    print(f"{'k':>3} {'l':>3} {'proj':>10} {'internal s':>11} {'full s':>9} {'ratio':>6} {'cpu ratio':>9} {'(k+1)/L':>8} "
          f"{'goal':>6}  ok")
    for r in rows:
        print(f"{r['k']:>3} {r['paper_layer']:>3} {r['projection']:>10} {r['internal_s']:>11.4f} {r['full_s']:>9.4f} {r['ratio']:>6.3f} "
              f"{r['cpu_ratio']:>9.3f} {r['ideal']:>8.3f} {r['goal']:>6.3f}  {'yes' if r['meets_goal'] else 'NO'}")
    if args.out:
        from bupo.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
