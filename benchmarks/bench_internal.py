"""Layer-k log-prob (forward + backward): bupo's truncated forward vs the official approach.

Official (Trae1ounG/BuPO, custom modeling files): a full forward with all hidden states, the model's own logits
computed anyway, then ``lm_head(hidden_states[k+1])``. bupo: ``layer_logprobs`` runs layers 0..k only.

Both are measured side by side in one run. Time: in one process, the two paths alternate step by step and the
fastest of ``--reps`` is kept (robust to a busy machine). Peak memory: each path in a fresh subprocess, so that
VmHWM (reset through /proc/self/clear_refs after warm-up) belongs to that path alone. Prints the ratios next to
the ideal (k+1)/L.

    python benchmarks/bench_internal.py [--layers 12] [--hidden 256] [--vocab 32000] [--seq 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bupo.internal import layer_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    k = args.k

    def official():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)  # full logits computed anyway
        z = model.lm_head(out.hidden_states[k + 1])
        lp = torch.log_softmax(z[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
        return lp.sum()

    def truncated():
        return layer_logprobs(model, ids, layer=k).sum()

    paths = {"official": official, "truncated": truncated}
    if args.path != "both":  # memory: one path alone in this process
        fn = paths[args.path]
        fn().backward()  # warm-up
        model.zero_grad(set_to_none=True)
        base = _status_mb("VmRSS")
        _peak_reset()
        fn().backward()
        return {"peak_mb": _status_mb("VmHWM") - base}
    times = {name: [] for name in paths}
    for fn in paths.values():  # warm-up
        fn().backward()
        model.zero_grad(set_to_none=True)
    for _ in range(args.reps):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return {f"{name}_s": min(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--path", choices=["both", "official", "truncated"], help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:  # child process
        print(json.dumps(run_one(args)))
        return
    L = args.layers
    rows = []
    print(f"Qwen3-shaped, L={L}, d={args.hidden}, V={args.vocab}, batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} threads; layer-k log-prob forward+backward, fastest of {args.reps} alternating steps")
    print(f"{'k':>3} {'paper l':>7} {'official s':>10} {'bupo s':>8} {'time ratio':>10} {'(k+1)/L':>8} "
          f"{'official MB':>11} {'bupo MB':>8} {'mem ratio':>9}")
    for k in sorted({1, L // 2, L - 2}):
        res = {}
        for path in ("both", "official", "truncated"):
            cmd = [sys.executable, __file__, "--path", path, "--k", str(k)] + [
                f"--{n}={getattr(args, n)}" for n in ("layers", "hidden", "vocab", "seq", "batch", "reps", "threads")
            ]
            res[path] = json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])
        o = {"seconds": res["both"]["official_s"], "peak_mb": res["official"]["peak_mb"]}
        t = {"seconds": res["both"]["truncated_s"], "peak_mb": res["truncated"]["peak_mb"]}
        row = dict(k=k, paper_layer=k + 1, official_s=o["seconds"], bupo_s=t["seconds"],
                   time_ratio=t["seconds"] / o["seconds"], ideal=(k + 1) / L,
                   official_mb=o["peak_mb"], bupo_mb=t["peak_mb"], mem_ratio=t["peak_mb"] / max(o["peak_mb"], 1e-9))
        rows.append(row)
        print(f"{k:>3} {k + 1:>7} {o['seconds']:>10.3f} {t['seconds']:>8.3f} {row['time_ratio']:>10.2f} "
              f"{row['ideal']:>8.2f} {o['peak_mb']:>11.0f} {t['peak_mb']:>8.0f} {row['mem_ratio']:>9.2f}")
    if args.json:
        from bupo.io import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
