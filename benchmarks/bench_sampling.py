"""Sampling speed on real vocabularies: bupo's seeded batched sampler vs plain ``model.generate(do_sample=True)``.

Both sides in one run, on the same model, prompts and lengths (EOS is switched off on both, so every row generates
exactly ``--new-tokens`` tokens): tokens/s of

- ``hf``: ``model.generate(do_sample=True, temperature=1, top_p=1, top_k=0)`` (top-k off; one shared torch RNG);
- ``bupo``: :func:`bupo.generation.generate_requests` at temperature 1, top_p 1 (per-row seeded streams, the
  vocabulary-order inverse CDF, no sort);
- ``bupo_sorted``: the same at top_p = 1 - 1e-9 (the path that sorts the full vocabulary every step, as every
  draw did before).

Vocabularies: 49,152 (SmolLM2-135M-Instruct, ``bupo model get smollm2-135m-instruct``) and 262,144 (Gemma-3-270M when
``bupo model get gemma3-270m`` works, else a random-init Gemma-3 of the same shape with a synthetic tokenizer).
The sides alternate rep by rep and the fastest of ``--reps`` is kept (robust to a busy machine). Goal: bupo's
tokens/s >= 1/1.2 of plain HF.

    python benchmarks/bench_sampling.py [--batch 8] [--new-tokens 32] [--reps 3] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three most important ideas in physics are",
    "def fibonacci(n):",
    "Write a short poem about the moon.",
    "In 1969, the first humans",
    "The recipe calls for two cups of flour and",
    "Question: what is 17 times 23? Answer:",
    "Dear hiring manager, I am writing to",
]


class _NoEos:
    """The tokenizer with no EOS, so that bupo's generate runs every row to max_new_tokens (as HF's side)."""

    eos_token_id = None

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __call__(self, *a: Any, **k: Any) -> Any:
        return self._tok(*a, **k)


def _synthetic(vocab: int) -> tuple[Any, Any, str]:
    """A random-init Gemma-3 with Gemma-3-270M's shape and a word-level tokenizer over ``vocab`` entries."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, pad_token_id=0,
                           eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(cfg).eval()
    words = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"w{i}" for i in range(4, vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return model, tok, f"random-init gemma3_text (270M shape), vocab {vocab}"


def _load(name: str, vocab: int) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.models import resolve_model

    try:
        folder = resolve_model(name)
    except ValueError as exc:
        if vocab < 100_000:
            raise
        print(f"[{name} unavailable: {exc}; using a random-init model]", file=sys.stderr)
        return _synthetic(vocab)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder), name


def bench(model: Any, tok: Any, label: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import GenerationConfig

    from bupo.generation import encode_prompt, generate_requests, sample_seed

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    ids, mask = ids.to(model.device), mask.to(model.device)
    n = args.new_tokens
    # top_k=0: off (None would mean transformers' default 50), so both sides sample the same distribution
    hf_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                              eos_token_id=None, pad_token_id=pad)
    saved_eos = model.generation_config.eos_token_id
    no_eos = _NoEos(tok)
    requests = [(p, sample_seed(0, i, 0)) for i, p in enumerate(prompts)]

    def hf() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_cfg)
        return int(out.shape[1] - width) * out.shape[0]

    def ours(top_p: float) -> int:
        model.generation_config.eos_token_id = None
        try:
            got = generate_requests(model, no_eos, requests, max_new_tokens=n, temperature=1.0, top_p=top_p,
                                    batch_size=args.batch)
        finally:
            model.generation_config.eos_token_id = saved_eos
        return sum(len(c.token_ids) for c in got)

    sides = {"hf": hf, "bupo": lambda: ours(1.0), "bupo_sorted": lambda: ours(1.0 - 1e-9)}
    for f in sides.values():  # warm-up (allocations, first-call overheads)
        f()
    best = {k: float("inf") for k in sides}
    for _ in range(args.reps):
        for k, f in sides.items():
            t0 = time.perf_counter()
            tokens = f()
            best[k] = min(best[k], time.perf_counter() - t0)
            assert tokens == args.batch * n, (k, tokens)  # same work on every side
    tps = {k: args.batch * n / v for k, v in best.items()}
    return {
        "model": label,
        "vocab": int(model.config.vocab_size),
        "batch": args.batch,
        "new_tokens": n,
        "seconds": best,
        "tokens_per_s": tps,
        "bupo_over_hf": tps["bupo"] / tps["hf"],
        "bupo_sorted_over_hf": tps["bupo_sorted"] / tps["hf"],
        "goal_met": tps["bupo"] / tps["hf"] >= 1 / 1.2,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct:49152", "gemma3-270m:262144"],
                    help="NAME:VOCAB pairs (a 262k one falls back to a random-init model when NAME is unavailable)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models:
        name, vocab = spec.rsplit(":", 1)
        model, tok, label = _load(name, int(vocab))
        model.to(args.device)
        r = bench(model, tok, label, args) | {"device": args.device, "threads": args.threads}
        rows.append(r)
        t = r["tokens_per_s"]
        print(f"{label:>40}  vocab {r['vocab']:>7}  {args.batch}x{args.new_tokens} tokens  "
              f"hf {t['hf']:7.1f} tok/s  bupo {t['bupo']:7.1f} ({r['bupo_over_hf']:.2f}x)  "
              f"bupo_sorted {t['bupo_sorted']:7.1f} ({r['bupo_sorted_over_hf']:.2f}x)  "
              f"goal >= {1 / 1.2:.2f}x: {'met' if r['goal_met'] else 'NOT met'}", flush=True)
        del model
    if args.json:
        from bupo.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
