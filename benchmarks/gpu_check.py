"""The GPU checks, as one script for a lent GPU machine (not part of the test suite).

    python benchmarks/gpu_check.py analysis --out DIR   # analysis throughput: Qwen3-4B-shaped, one 8192-token trace, all streams
    python benchmarks/gpu_check.py core --out DIR       # core checks in bf16 on a Qwen3-0.6B shape + bench ratio
    python benchmarks/gpu_check.py train --out DIR      # training: 2 internal + 2 full BuPO steps, bf16, HF generation
    python benchmarks/gpu_check.py launchers --out DIR  # real launchers: accelerate launch zero3.yaml and fsdp2.yaml, 1 GPU
    python benchmarks/gpu_check.py quick --out DIR      # core, then launchers in what is left of 5 minutes (gpu_check.sh)
    python benchmarks/gpu_check.py all --small          # the same code paths on tiny shapes (CPU dry run)

``launchers`` needs trl, deepspeed and bupo's other dependencies the GPU image lacks: ``bash benchmarks/gpu_check.sh``
installs the wheels carried in ``.whl/`` and runs it (the one command for a lent GPU machine); without deepspeed the
ZeRO-3 half is reported as FAIL, not skipped. With ``--small`` it runs the ``fsdp2-cpu`` recipe (2 CPU processes).

Every model is random-init (there is no hub); shapes follow the public configs. Each section prints its lines,
writes ``gpu_<section>.json`` to ``--out`` and exits non-zero if one of its checks fails. Conventions: 0-based
layer k (paper layer k+1), entropies in nats, ``raw`` projection unless stated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM), for the spec floor


def _qwen3(L: int, d: int, V: int, heads: int, kv: int, inter: int, ctx: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=V, hidden_size=d, intermediate_size=inter, num_hidden_layers=L,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128 if d >= 1024 else d // heads,
                       max_position_embeddings=ctx, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _setup(small: bool):
    import torch

    cuda = torch.cuda.is_available() and not small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    return torch, device, dtype, cuda


def _model(cfg, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    with device:  # init directly on the GPU: a 4B model's CPU init would take minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def _sync(torch, cuda):
    if cuda:
        torch.cuda.synchronize()


def _best(fn, torch, cuda, reps=3):
    best = float("inf")
    for _ in range(reps):
        _sync(torch, cuda)
        t0 = time.perf_counter()
        fn()
        _sync(torch, cuda)
        best = min(best, time.perf_counter() - t0)
    return best


def _device_name(torch, cuda) -> str:
    return torch.cuda.get_device_name(0) if cuda else "cpu"


def _tokenizer():
    from transformers import AutoTokenizer

    from bupo.zoo import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path())


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, **values) -> None:
        self.rows.append({"check": name, "ok": bool(ok), **values})
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {shown}", flush=True)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)


# ---------------------------------------------------------------------------------------------------------------
# analysis throughput against the GEMM floor


def section_analysis(small: bool) -> dict:
    torch, device, dtype, cuda = _setup(small)
    from bupo.analysis import analyze
    from bupo.internal.stats import Projector
    from bupo.internal.streams import capture_streams

    L, d, V, heads, kv, inter, T = (36, 2560, 151936, 32, 8, 9728, 8192) if not small else (4, 64, 4096, 4, 2, 128, 512)
    model = _model(_qwen3(L, d, V, heads, kv, inter, T + 64), device, dtype).eval().requires_grad_(False)
    tok = _tokenizer()
    checks = Checks()
    g = torch.Generator().manual_seed(1)
    prompt = "Q: 1+1? A:"  # verbatim string prompt; its ids come from the bundled char tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    P = len(prompt_ids)
    resp = torch.randint(3, V, (T - P,), generator=g).tolist()
    trace = {"prompt": prompt, "response": "", "response_ids": resp}
    ids = torch.tensor([prompt_ids + resp], device=device)
    S = 5 * L + 2  # projections per token: embedding, 5 per layer (attn_in/out, mlp_in/out, resid_post), final
    out: dict = {"device": _device_name(torch, cuda), "torch": torch.__version__, "model": "random-init Qwen3",
                 "num_layers": L, "d": d, "vocab": V, "tokens": T, "streams_projected": S, "dtype": str(dtype)}
    print(f"analysis: {out['device']}, L={L}, d={d}, V={V}, T={T}, {S} projections per token", flush=True)

    with torch.inference_mode():
        fwd = _best(lambda: model.model(input_ids=ids, use_cache=False), torch, cuda)
        h = torch.randn(T, d, device=device, dtype=dtype, generator=None)
        w = model.lm_head.weight
        gemm_bf16 = _best(lambda: torch.mm(h, w.t()), torch, cuda, reps=5)
        gemm = gemm_bf16
        if cuda:
            gemm = _best(lambda: torch.mm(h, w.t(), out_dtype=torch.float32), torch, cuda, reps=5)
    flops = 2.0 * d * V * T * S
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in out["device"]), None)
    out.update(forward_s=fwd, gemm_one_stream_s=gemm_bf16, gemm_one_stream_fp32_out_s=gemm,
               gemm_tflops=2.0 * d * V * T / gemm_bf16 / 1e12,
               floor_measured_s=S * gemm_bf16, floor_spec_s=flops / (spec * 1e12) if spec else None)
    print(f"  forward {fwd:.3f} s; one-stream GEMM {gemm_bf16 * 1e3:.2f} ms bf16-out ({out['gemm_tflops']:.0f} "
          f"TFLOP/s), {gemm * 1e3:.2f} ms fp32-out; floor {S} x GEMM = {out['floor_measured_s']:.3f} s"
          + (f", spec floor {out['floor_spec_s']:.3f} s" if spec else ""), flush=True)

    # accuracy of the fast path: bf16 operands, fp32 accumulate, against an fp64 reference of the same values
    with torch.inference_mode(), capture_streams(model, streams=("resid_post", "attn_out"), layers=[1, L // 2]) as st:
        model.model(input_ids=ids[:, :512], use_cache=False)
    proj = Projector(model, "raw")
    w64 = model.lm_head.weight.double()
    worst = 0.0
    for hs in st.values():
        x = hs[0, :256]
        ref = torch.distributions.Categorical(logits=x.double() @ w64.t()).entropy().cpu()
        worst = max(worst, (proj.stats(x, chunk_size=128).entropy.double().cpu() - ref).abs().max().item())
    checks.add("entropy vs fp64 reference (bf16 operands)", worst < 1e-3, max_abs_nats=worst, gemm=proj.gemm,
               epilogue=proj.epilogue)

    # the epilogue alone on one stream's fp32 logits: eager vs compiled vs the Triton kernel's launch shapes
    from bupo.internal import stats as stats_mod
    from bupo.internal import triton_entropy

    epi: dict = {}
    with torch.inference_mode():
        buf = {"z": torch.randn(min(T, 8192), V, device=device) * 4.0}
        nbytes = buf["z"].numel() * 4
        cands = {"eager": lambda: stats_mod._entropy_epilogue_eager(buf["z"].clone()),
                 "compiled": lambda: stats_mod._compiled_epilogue()(buf["z"])}
        if cuda and triton_entropy.AVAILABLE:
            for blk, nw in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
                cands[f"triton_{blk}_{nw}"] = lambda blk=blk, nw=nw: triton_entropy.entropy_epilogue_triton(
                    buf["z"], blk, nw)
        clone_s = _best(lambda: buf["z"].clone(), torch, cuda)
        ref = stats_mod.entropy_epilogue(buf["z"])[0]
        for name, fn in cands.items():
            fn()
            sec = _best(fn, torch, cuda, reps=5) - (clone_s if name == "eager" else 0.0)
            err = (fn()[0] - ref).abs().max().item()
            epi[name] = {"ms": sec * 1e3, "read_GBps": nbytes / sec / 1e9, "max_abs_vs_compiled": err}
            print(f"  epilogue {name}: {sec * 1e3:.2f} ms ({nbytes / sec / 1e9:.0f} GB/s of logits read), "
                  f"max |dH| vs compiled {err:.1e}", flush=True)
        buf.clear()
    tri = {k: v for k, v in epi.items() if k.startswith("triton_")}
    if tri:
        best_name = min(tri, key=lambda k: tri[k]["ms"])
        triton_entropy.BLOCK, triton_entropy.NUM_WARPS = (int(x) for x in best_name.split("_")[1:])
        out["triton_launch"] = best_name
        checks.add("triton epilogue == compiled epilogue", tri[best_name]["max_abs_vs_compiled"] < 1e-4,
                   max_abs_nats=tri[best_name]["max_abs_vs_compiled"], launch=best_name)
    out["epilogue_one_stream"] = epi

    runs = []
    # first: the defaults (chunk rows and epilogue chosen by bupo), then fixed alternatives
    variants = ([(None, "auto"), (2048, "triton"), (8192, "compiled"), (2048, "eager")] if cuda
                else [(None, "auto"), (256, "eager"), (256, "compiled")])
    for chunk, comp in variants:
        warm = dict(trace, response_ids=resp[:1000])  # compile + allocator warm-up outside the timing
        analyze(model, tok, traces=[warm], figures=False, keep_tokens=False, chunk_size=chunk, epilogue=comp,
                batch_tokens=T + 64)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        _sync(torch, cuda)
        t0 = time.perf_counter()
        res = analyze(model, tok, traces=[trace], figures=False, keep_tokens=False, chunk_size=chunk,
                      epilogue=comp, batch_tokens=T + 64)
        _sync(torch, cuda)
        sec = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        r = {"chunk": res.summary["chunk_size"], "asked": f"chunk={chunk}, epilogue={comp}", "epilogue": res.summary["epilogue"], "gemm": res.summary["gemm"],
             "seconds": sec, "projection_seconds": sec - fwd, "peak_extra_gib": peak,
             "floor_fraction": out["floor_measured_s"] / sec,
             "floor_fraction_excl_forward": out["floor_measured_s"] / max(sec - fwd, 1e-9),
             "spec_floor_fraction": (out["floor_spec_s"] / sec) if spec else None,
             "num_tokens": res.summary["num_tokens"], "final_entropy": res.summary["final_entropy"],
             "layer_entropy": res.summary["layer_entropy"]}
        runs.append(r)
        print(f"  analyze chunk={r['chunk']} epilogue={r['epilogue']}{' (defaults)' if chunk is None else ''}: {sec:.3f} s for {r['num_tokens']} tokens, "
              f"{r['floor_fraction']:.0%} of the measured GEMM floor ({r['floor_fraction_excl_forward']:.0%} "
              f"without the forward), peak +{peak:.2f} GiB", flush=True)
    agree = max(abs(a - b) for r in runs for a, b in zip(r["layer_entropy"], runs[0]["layer_entropy"], strict=True))
    checks.add("all epilogues give the same layer entropies", agree < 1e-3, max_abs_nats=agree)
    out["runs"] = runs
    best = max(runs, key=lambda r: r["floor_fraction"])
    checks.add("all tokens analysed", all(r["num_tokens"] == T - P for r in runs), tokens=runs[0]["num_tokens"])
    checks.add("fraction of GEMM floor >= 60% (target)", best["floor_fraction"] >= 0.6,
               fraction=best["floor_fraction"], seconds=best["seconds"])

    # the official script's per-stream computation: fp32 weights, [T, V] fp32 logits, softmax + log_softmax,
    # stream offloaded to the CPU and back (its hooks keep .cpu() copies); 6 projections per layer
    w32 = model.lm_head.weight.float()

    def official_stream():
        x = h.float().cpu().to(device)
        z = x @ w32.t()
        p, lp = torch.softmax(z, -1), torch.log_softmax(z, -1)
        return (-(p * lp).sum(-1)).cpu()

    with torch.inference_mode():
        official_stream()
        per = _best(official_stream, torch, cuda, reps=3)
    est = per * 6 * L
    out.update(official_per_stream_s=per, official_estimate_s=est)
    print(f"  official-style: {per * 1e3:.1f} ms per stream -> {est:.1f} s for 6L={6 * L} streams (extrapolated, "
          f"without its eager output_attentions forward, which runs out of memory at 8k); bupo best "
          f"{best['seconds']:.2f} s = {est / best['seconds']:.1f}x faster", flush=True)
    out["speedup_vs_official_estimate"] = est / best["seconds"]
    out["checks"] = checks.rows
    out["ok"] = checks.ok
    return out


# ---------------------------------------------------------------------------------------------------------------
# the core on CUDA in bf16, and the layer-k log-prob benchmark ratio


def section_core(small: bool) -> dict:
    torch, device, dtype, cuda = _setup(small)
    from bupo.internal import capture_streams, internal_policy, layer_logits, layer_logprobs
    from bupo.internal.stats import Projector

    L, d, V, heads, kv, inter = (28, 1024, 151936, 16, 8, 3072) if not small else (6, 64, 512, 4, 2, 128)
    model = _model(_qwen3(L, d, V, heads, kv, inter, 4096), device, dtype).eval()
    checks = Checks()
    out: dict = {"device": _device_name(torch, cuda), "torch": torch.__version__, "num_layers": L, "d": d,
                 "vocab": V, "dtype": str(dtype)}
    print(f"core: {out['device']}, Qwen3-0.6B-shaped L={L}, d={d}, V={V}, {dtype}", flush=True)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, 256), generator=g).to(device)
    ks = sorted({0, L // 2, L - 2})
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        for k in ks:
            ref = model.lm_head(full.hidden_states[k + 1]).float()
            with internal_policy(model, k, "raw") as m:
                got = m(input_ids=ids, use_cache=False).logits.float()
            diff = (got - ref).abs().max().item()
            checks.add(f"raw logits k={k} == lm_head(hidden_states[k+1])", diff <= 1e-2 * ref.abs().max().item(),
                       max_abs=diff, scale=ref.abs().max().item())
        with internal_policy(model, L - 1, "final_norm") as m:
            got = m(input_ids=ids, use_cache=False).logits.float()
        diff = (got - full.logits.float()).abs().max().item()
        checks.add("final_norm at k=L-1 == model logits", diff <= 1e-2 * full.logits.float().abs().max().item(),
                   max_abs=diff)
        k = L // 2
        with capture_streams(model, streams=("resid_pre", "attn_out", "mlp_out", "resid_post"), layers=[k]) as st:
            model(input_ids=ids, use_cache=False)
        parts = [st[(s, k)].float() for s in ("resid_pre", "attn_out", "mlp_out")]
        post = st[("resid_post", k)].float()
        rel = ((parts[0] + parts[1] + parts[2]) - post).abs().max().item() / post.abs().max().item()
        checks.add("resid_post == resid_pre + attn_out + mlp_out", rel <= 2e-2, rel_err=rel)
        x = post[0, :256].to(dtype)
        ref = torch.distributions.Categorical(logits=x.double() @ model.lm_head.weight.double().t()).entropy().cpu()
        proj = Projector(model, "raw")
        err = (proj.stats(x, chunk_size=100).entropy.double().cpu() - ref).abs().max().item()
        checks.add("chunked entropy vs dense fp64", err <= 1e-3, max_abs_nats=err, gemm=proj.gemm,
                   epilogue=proj.epilogue)

    # gradient isolation and the number of layers run
    calls = [0] * L
    hooks = [layer.register_forward_pre_hook(lambda mod, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    model.zero_grad(set_to_none=True)
    layer_logprobs(model, ids, layer=k).sum().backward()
    for hk in hooks:
        hk.remove()
    checks.add("layers run == k+1", calls == [1] * (k + 1) + [0] * (L - k - 1), ran=sum(calls), k=k)
    above = [p.grad is None for layer in model.model.layers[k + 1:] for p in layer.parameters()]
    below = [p.grad is not None and bool(torch.isfinite(p.grad).all()) for layer in model.model.layers[: k + 1]
             for p in layer.parameters()]
    checks.add("no grad above k, none on the final norm; finite grads at or below k",
               all(above) and all(below) and model.model.norm.weight.grad is None,
               above_none=all(above), below_finite=all(below))
    model.zero_grad(set_to_none=True)

    # greedy generation from the layer-k policy == argmax of the layer-k logits, teacher-forced
    with torch.no_grad():
        prompt = ids[:1, :32]
        with internal_policy(model, k, "raw") as m:
            gen = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        z = layer_logits(model, gen, layer=k).float()[0, 31:-1]
        top2 = z.topk(2, dim=-1).values
        agree = (z.argmax(-1) == gen[0, 32:]).float()
        gaps = (top2[:, 0] - top2[:, 1])[agree == 0]
        # step 1 reads the prompt with no KV cache in both paths and must agree; later steps may flip only where
        # the top-2 logits are within bf16 noise of each other
        tol = 0.05 * z.abs().max().item()
        checks.add("greedy generate == argmax pi^k", bool(agree[0]) and bool((gaps <= tol).all()),
                   agreement=agree.mean().item(), max_gap_at_flips=gaps.max().item() if len(gaps) else 0.0)

    # benchmark ratio: layer-k log-prob forward+backward, truncated vs the official full forward + hidden_states
    model.train()
    bids = torch.randint(3, V, (4, 1024 if not small else 128), generator=g).to(device)
    bench = []
    for kb in sorted({1, L // 2, L - 2}):
        def official(kb=kb):
            o = model(input_ids=bids, output_hidden_states=True, use_cache=False)
            lp = torch.log_softmax(model.lm_head(o.hidden_states[kb + 1])[:, :-1].float(), -1)
            return lp.gather(-1, bids[:, 1:, None]).sum()

        def truncated(kb=kb):
            return layer_logprobs(model, bids, layer=kb).sum()

        res = {}
        for name, fn in (("official", official), ("bupo", truncated)):
            fn().backward()
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            t = _best(lambda fn=fn: (fn().backward(), model.zero_grad(set_to_none=True)), torch, cuda, reps=5)
            res[name] = (t, (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan"))
        row = {"k": kb, "official_s": res["official"][0], "bupo_s": res["bupo"][0],
               "time_ratio": res["bupo"][0] / res["official"][0], "ideal": (kb + 1) / L,
               "official_mb": res["official"][1], "bupo_mb": res["bupo"][1],
               "mem_ratio": res["bupo"][1] / res["official"][1] if cuda else float("nan")}
        bench.append(row)
        print(f"  bench k={kb}: official {row['official_s'] * 1e3:.1f} ms, bupo {row['bupo_s'] * 1e3:.1f} ms, "
              f"time ratio {row['time_ratio']:.2f} ((k+1)/L = {row['ideal']:.2f}), memory ratio "
              f"{row['mem_ratio']:.2f}", flush=True)
    out["bench"] = bench
    out["checks"] = checks.rows
    out["ok"] = checks.ok
    return out


# ---------------------------------------------------------------------------------------------------------------
# BuPO steps on the GPU


def section_train(small: bool, out_dir: Path) -> dict:
    torch, device, dtype, cuda = _setup(small)
    from transformers import TrainerCallback

    from bupo.data.task import make_examples
    from bupo.evaluation import resolve_template
    from bupo.training.config import BuPOConfig
    from bupo.training.data import build_prompt_dataset
    from bupo.training.trainer import BuPOTrainer

    L, d, V, heads, kv, inter = (28, 1024, 151936, 16, 8, 3072) if not small else (4, 64, 512, 4, 2, 128)
    k = L // 2 - 1
    model = _model(_qwen3(L, d, V, heads, kv, inter, 4096), device, dtype)
    tok = _tokenizer()
    tok.padding_side = "left"
    checks = Checks()
    ds = build_prompt_dataset(make_examples("train", 32, 0), tok, resolve_template(tok, "auto"))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = BuPOConfig(
        output_dir=str(out_dir / "train_tmp"), use_cpu=not cuda, bf16=cuda, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=128 if not small else 16,
        learning_rate=1e-3,  # bf16 weights: a step must be visible above bf16 rounding
        internal_layer=k, internal_steps=2, max_steps=4, probe_every=1, logging_steps=1, save_strategy="no",
        generation_kwargs={"min_new_tokens": 128 if not small else 16},
    )

    def reward(completions, **kw):  # alternating rewards: non-zero advantages in every group
        return [float(i % 2) for i in range(len(completions))]

    trainer = BuPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    steps: list[dict] = []

    def group(name):
        if name.startswith("model.layers."):
            return int(name.split(".")[2])
        return name

    def changed(names):
        now = dict(model.named_parameters())
        return [n for n in names if not torch.equal(initial[n], now[n].detach())]

    above = [n for n in initial if isinstance(group(n), int) and group(n) > k]
    below = [n for n in initial if isinstance(group(n), int) and group(n) <= k]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(torch, cuda)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(torch, cuda)
            # the phase is set when the step's rollout is made, so read it at the end of the step
            steps.append({"step": state.global_step, "phase": "internal" if trainer.bupo_internal else "full",
                          "seconds": time.perf_counter() - self.t0})
            print(f"  step {state.global_step} ({steps[-1]['phase']}, k={k}): {steps[-1]['seconds']:.2f} s",
                  flush=True)
            if state.global_step == 2:
                ch_above, ch_below = changed(above), changed(below)
                checks.add("after 2 internal steps: layers above k unchanged, layers <= k updated",
                           not ch_above and len(ch_below) > 0, changed_above=len(ch_above),
                           changed_at_or_below=len(ch_below), of=len(below))

    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    ch_above = changed(above)
    checks.add("after 2 full steps: layers above k updated", len(ch_above) > 0, changed_above=len(ch_above))
    checks.add("2 internal + 2 full steps ran", [s["phase"] for s in steps] == ["internal"] * 2 + ["full"] * 2,
               phases=",".join(s["phase"] for s in steps))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = {"device": _device_name(torch, cuda), "torch": torch.__version__, "num_layers": L, "d": d, "vocab": V,
           "k": k, "dtype": str(dtype), "steps": steps, "train_seconds": total,
           "log": [{key: v for key, v in h.items() if isinstance(v, (int, float))} for h in logs]}
    for phase in ("internal", "full"):
        ts = [s["seconds"] for s in steps if s["phase"] == phase]
        out[f"{phase}_step_s"] = ts
    out["checks"] = checks.rows
    out["ok"] = checks.ok
    return out


# ---------------------------------------------------------------------------------------------------------------
# real launchers (accelerate launch with the shipped configs) through bupo train

LAUNCH_BUDGET_S = 285  # both runs, model creation included: the section stays under 5 minutes
LAUNCH_CAP_S = {"zero3": 150, "fsdp2": 130}  # each run's own timeout (less when the budget has less left)
LM_HEAD_WARNING = "did not run forward before backward"


def _run_launch(cmd: list[str], env: dict, cwd: Path, timeout: float) -> tuple[object, str, str]:
    """(rc or "timeout", stdout, stderr) of one launch; a timeout kills the launcher's whole process group (its
    ranks hold the GPU) and keeps what they printed (tests/support/launchers.py ``run_group``)."""
    import subprocess

    sys.path.insert(0, str(cwd / "tests"))
    from support.launchers import run_group

    try:
        proc = run_group(cmd, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        return "timeout", exc.output or "", exc.stderr or ""
    return proc.returncode, proc.stdout, proc.stderr


def _launch_verdicts(checks: Checks, name: str, recs: list[dict], rc: object, stderr: str) -> None:
    """One line per probe verdict, from whatever the ranks wrote (a run stopped by its timeout leaves a prefix)."""
    def step(rec, s):
        return rec.get("steps", {}).get(s)

    def verdict(label, values, ok_fn, **shown):
        if not values or any(v is None for v in values):
            checks.add(f"{name}: {label}", False, result=f"no data: the run ended before it (rc={rc})")
        else:
            checks.add(f"{name}: {label}", all(ok_fn(v) for v in values), **shown)

    parity = [r.get("parity") for r in recs] or [None]
    p0 = parity[0] or {}
    verdict("internal log-probs equal the unsharded reference (TRL's fused head, truncated forward)", parity,
            lambda v: v["mean_abs"] < 0.05 and v["mean_abs"] < 0.1 * v["ref_vs_full_mean_abs"],
            mean_abs=p0.get("mean_abs", float("nan")), max_abs=p0.get("max_abs", float("nan")),
            ref_vs_full=p0.get("ref_vs_full_mean_abs", float("nan")))
    s1 = [step(r, "1") for r in recs] or [None]
    key = "watched_master_same" if name == "zero3" else "upper_same"  # ZeRO-3: fp32 masters (bf16 hides decay)
    verdict("phase 1 internal, layers > k and final norm bitwise unchanged (every rank"
            + (", fp32 masters)" if name == "zero3" else ")"), s1,
            lambda v: v["internal"] and v[key] and not v["lower_same"],
            upper_same=(s1[0] or {}).get(key), n_upper=(s1[0] or {}).get("n_upper"))
    s2 = [step(r, "2") for r in recs] or [None]
    verdict("phase 2 full, layers > k move", s2, lambda v: not v["internal"] and not v["upper_same"])
    missed = [m for r in recs for v in r.get("steps", {}).values() for m in v.get("missed_forward", [])]
    checks.add(f"{name}: no FSDP unit missed a forward (no lm_head warning), both phases",
               LM_HEAD_WARNING not in stderr and not missed and bool(recs and recs[0].get("steps")),
               warning_in_log=LM_HEAD_WARNING in stderr, missed=sorted(set(missed)))
    first = [r.get("first_full_update") for r in recs] or [None]
    verdict("first full-phase update = fresh AdamW step 1 (median |dw|/lr of layer k+1, last layer, norm)", first,
            lambda v: abs(v["median_update_over_lr"] - 1.0) < 0.1,
            median_update_over_lr=(first[0] or {}).get("median_update_over_lr", float("nan")))


def section_launchers(small: bool, out_dir: Path, budget_s: float = LAUNCH_BUDGET_S) -> dict:
    """``accelerate launch --config_file src/bupo/recipes/accelerate/{zero3,fsdp2}.yaml --num_processes 1`` running
    ``bupo train`` (tests/support/launch_probe.py records each rank's shards) on a random-init Qwen3-0.6B shape: 1 internal
    + 1 full rollout step at k = 13 (paper layer 14) with the adaptive switch (capped at 1: its signals' forward runs
    before rollout 2) and an evaluation before training and after each step, each run under its own timeout, the
    whole section under 5 minutes (``budget_s``). Verdicts, printed per run even when it timed out (the probe writes after every event): the internal
    log-probs through the wrapped model equal an unsharded reference, layers above k and the final norm bitwise
    unchanged while internal (ZeRO-3: the fp32 masters), moved after the switch, no FSDP unit missed a forward
    (the lm_head warning), the first full-phase update a fresh AdamW step 1, bupo_run.json's sharding. ``--small``:
    the ``fsdp2-cpu`` recipe on 2 CPU processes (accelerate runs DeepSpeed only on GPUs)."""
    import importlib.util

    torch, device, dtype, cuda = _setup(small)
    t_start = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    checks = Checks()
    L, d, V, heads, kv, inter = (28, 1024, 151936, 16, 8, 3072) if not small else (4, 64, 512, 4, 2, 128)
    k = 13 if not small else 1
    model_dir = out_dir / "launch_model"
    if not (model_dir / "config.json").is_file():
        model = _model(_qwen3(L, d, V, heads, kv, inter, 4096), device, torch.float32)
        model.save_pretrained(model_dir)  # fp32 on disk: bupo train loads fp32 master weights
        _tokenizer().save_pretrained(model_dir)
        del model
    runs = [("zero3", "zero3.yaml"), ("fsdp2", "fsdp2.yaml")] if cuda else [("fsdp2", "fsdp2-cpu.yaml")]
    out: dict = {"device": _device_name(torch, cuda), "torch": torch.__version__, "num_layers": L, "k": k, "runs": {},
                 "model_seconds": time.perf_counter() - t_start}
    env = {**os.environ, "BUPO_PROBE_ALTERNATING_REWARD": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for name, config in runs:
        left = budget_s - (time.perf_counter() - t_start)
        timeout = min(LAUNCH_CAP_S[name] * (1 if cuda else 3), left)
        if name == "zero3" and importlib.util.find_spec("deepspeed") is None:
            checks.add(f"{name}: deepspeed importable", False, hint="install the carried wheels (gpu_check.sh)")
            continue
        if cuda and timeout < 60:
            checks.add(f"{name}: run", False, result=f"not started: {left:.0f} s of the section budget left")
            continue
        run_dir, probe_dir = out_dir / f"launch_{name}", out_dir / f"launch_{name}_probe"
        for stale in (run_dir, probe_dir):  # a verdict must come from this run
            shutil.rmtree(stale, ignore_errors=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "src" / "bupo" / "recipes" / "accelerate" / config),
               *(["--num_processes", "1"] if cuda else []), str(root / "tests" / "support" / "launch_probe.py"),
               str(probe_dir), "train", "--model", str(model_dir), "--algo", "bupo", "--internal-layer", str(k),
               "--internal-steps", "auto", "--internal-steps-max", "1", "--out", str(run_dir),
               "--eval-data", "bundled", "--eval_rows", "4", "--eval_samples", "2", "--eval_every", "1", "--max_steps", "2",
               "--steps_per_generation", "1", "--per_device_train_batch_size", "8", "--num_generations", "8",
               "--max_completion_length", "64" if cuda else "16", "--learning_rate", "1e-5", "--weight_decay", "0.01",
               "--save_strategy", "no", "--probe_every", "1", "--logging_steps", "1", "--disable_tqdm", "true",
               "--max_prompt_length", "512", *(["--bf16", "true", "--gradient_checkpointing", "true"] if cuda else [])]
        t0 = time.perf_counter()
        rc, stdout, stderr = _run_launch(cmd, env, root, timeout)
        seconds = time.perf_counter() - t0
        checks.add(f"{name}: bupo train ran to the end within its timeout", rc == 0, rc=rc, seconds=seconds,
                   timeout=timeout)
        if rc != 0:
            print(stdout[-1500:] + stderr[-3000:], flush=True)
        recs = [json.loads(f.read_text()) for f in sorted(probe_dir.glob("probe-rank*.json"))]
        _launch_verdicts(checks, name, recs, rc, stderr)
        summary = json.loads((run_dir / "bupo_run.json").read_text()) if (run_dir / "bupo_run.json").is_file() else {}
        sharding = summary.get("sharding") or {}
        want = {"zero3": ("deepspeed", "zero_stage", 3), "fsdp2": ("fsdp2", "param_type", "DTensor")}[name]
        checks.add(f"{name}: bupo_run.json records the sharding", sharding.get("launcher") == want[0]
                   and sharding.get(want[1]) == want[2], sharding=sharding or None)
        evals, switch = [e.get("step") for e in summary.get("evals", [])], summary.get("switch") or {}
        checks.add(f"{name}: evaluations at steps 0, 1, 2 and the adaptive switch (cap 1) at rollout step 2",
                   evals == [0, 1, 2] and switch.get("mode") == "auto" and switch.get("step") == 2,
                   evals=evals, switch_step=switch.get("step"))
        if summary:
            checks.add(f"{name}: fp32 master weights, {summary['mixed_precision']} autocast",
                       summary["weights_dtype"] == "float32", weights=summary["weights_dtype"])
        out["runs"][name] = {"rc": rc, "seconds": seconds, "timeout": timeout, "probe": recs, "summary": summary,
                             "tail": (stdout[-1500:] + stderr[-3000:]) if rc != 0 else ""}
    out["seconds"] = time.perf_counter() - t_start
    out["checks"] = checks.rows
    out["ok"] = checks.ok
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=("analysis", "core", "train", "launchers", "quick", "all"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_<section>.json")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a dry run of the same code")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok, t_start = True, time.perf_counter()
    quick = args.section == "quick"  # core's bf16 checks, then the launchers in the rest of the 5 minutes
    for name in {"all": ("analysis", "core", "train", "launchers"), "quick": ("core", "launchers")}.get(
            args.section, (args.section,)):
        t0 = time.perf_counter()
        fn = {"analysis": lambda: section_analysis(args.small), "core": lambda: section_core(args.small),
              "train": lambda: section_train(args.small, out_dir),
              "launchers": lambda: section_launchers(args.small, out_dir,
                                                     LAUNCH_BUDGET_S - (time.perf_counter() - t_start if quick else 0.0))}[name]
        res = fn()
        res["section_seconds"] = time.perf_counter() - t0
        (out_dir / f"gpu_{name}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"== {name}: {'PASS' if res['ok'] else 'FAIL'} in {res['section_seconds']:.0f} s", flush=True)
        ok = ok and res["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
