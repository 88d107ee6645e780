"""The three entropy epilogues (eager, torch.compile, Triton) against a dense fp64 reference, and their selection."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bupo.internal import Projector
from bupo.internal.stats import _compiled_epilogue, _entropy_epilogue_eager, auto_chunk_rows, entropy_epilogue
from support.tiny_models import tiny_model

SRC = Path(__file__).resolve().parents[2] / "src"


def hard_logits(n: int = 40, V: int = 3000, seed: int = 0) -> torch.Tensor:
    """Rows from near-uniform to one-hot: logit scales 1e-2..3e2 (raw residual streams reach the hundreds),
    a spiked row, a row of exact ties, a row whose max sits in the last column."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * torch.logspace(-2, 2.5, n)[:, None]
    z[1, 17] = 1e3
    z[2] = 0.5
    z[3, -1] = z[3].max() + 5
    z += 150.0 * (torch.arange(n) % 3 == 0)[:, None]  # large common offsets: no cancellation allowed
    return z


def reference(z: torch.Tensor):
    lp = z.double().log_softmax(-1)
    plogp = torch.where(torch.isinf(lp), 0.0, lp.exp() * lp)  # 0 log 0 = 0 for masked (-inf) entries
    return -plogp.sum(-1), torch.logsumexp(z.double(), -1), z.argmax(-1), lp.max(-1).values.exp()


def check(out, z, tol=2e-5):
    ent, lse, arg, p1 = out
    r_ent, r_lse, r_arg, r_p1 = reference(z)
    assert (ent.double().cpu() - r_ent).abs().max() < tol
    assert ((lse.double().cpu() - r_lse).abs() / r_lse.abs().clamp_min(1)).max() < 1e-6
    assert torch.equal(arg.cpu(), r_arg)  # first occurrence on ties, as torch.argmax
    assert (p1.double().cpu() - r_p1).abs().max() < 1e-6


def masked(z: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[5, :10] = float("-inf")  # masked vocabulary entries: 0 log 0 = 0, never nan
    return z


def test_eager_epilogue_matches_fp64():
    for z in (hard_logits(), masked(hard_logits())):
        check(_entropy_epilogue_eager(z.clone()), z)
        check(entropy_epilogue(z.clone()), z)


def test_compiled_epilogue_matches_fp64_and_any_row_count():
    z = hard_logits()
    fn = _compiled_epilogue()
    check(fn(z), z)
    check(fn(z[:7].contiguous()), z[:7])  # dynamic rows: the last chunk of a trace is shorter
    check(fn(masked(z)), masked(z))


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="the dev extra installs Triton on Linux x86_64 only")
def test_triton_kernel_matches_fp64_in_the_interpreter(tmp_path):
    # the kernel is CUDA code; TRITON_INTERPRET=1 runs the same program on the CPU (it must be set before import)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]  # this file, support/
        from test_epilogues import hard_logits, check, masked
        from bupo.internal import triton_entropy
        assert triton_entropy.AVAILABLE, "Triton is not installed (pip install -e .[dev])"
        for V, block in ((3000, 256), (1024, 1024), (1000, 2048)):
            z = hard_logits(V=V)
            check(triton_entropy.entropy_epilogue_triton(z, block=block, num_warps=4), z)
        z = masked(hard_logits(V=1000))
        check(triton_entropy.entropy_epilogue_triton(z, block=256), z)
        print("ok")
    """))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_projector_picks_and_validates_the_epilogue():
    small = tiny_model("qwen3", layers=2)
    assert Projector(small).epilogue == "eager"  # tiny vocabulary: a compile would cost more than it saves
    assert Projector(small, epilogue="compiled").epilogue == "compiled"
    big = tiny_model("qwen3", layers=1, vocab_size=16384)
    assert Projector(big).epilogue == "compiled"
    with pytest.raises(ValueError, match="accepted: auto, eager, compiled, triton"):
        Projector(small, epilogue="fused")
    with pytest.raises(ValueError, match="needs Triton and the model on a CUDA device"):
        Projector(small, epilogue="triton")
    assert Projector(small).gemm == "fp32"
    assert Projector(small).default_chunk == auto_chunk_rows(small.lm_head.weight) == 1024


def test_projections_agree_across_epilogues():
    m = tiny_model("gemma2", tie=True)  # softcap + tied embeddings
    h = torch.randn(37, m.config.hidden_size) * 5
    t = torch.randint(0, m.config.vocab_size, (37,))
    a = Projector(m, "final_norm", epilogue="eager").stats(h, targets=t, chunk_size=8)
    b = Projector(m, "final_norm", epilogue="compiled").stats(h, targets=t, chunk_size=8)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.allclose(a.logprob, b.logprob, atol=1e-5)
    assert torch.equal(a.top1_id, b.top1_id)
    assert torch.allclose(a.top1_prob, b.top1_prob, atol=1e-6)


def test_a_failing_compile_falls_back_under_auto_and_raises_when_asked_for(monkeypatch):
    from bupo.internal import stats as stats_mod

    def broken():
        def run(z):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(stats_mod, "_compiled_epilogue", broken)
    big = tiny_model("qwen3", layers=1, vocab_size=16384)
    h = torch.randn(5, big.config.hidden_size)
    p = Projector(big)  # auto picks compiled for a 16k vocabulary
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = p.stats(h)
    assert p.epilogue == "eager"
    assert torch.allclose(got.entropy, Projector(big, epilogue="eager").stats(h).entropy)
    with pytest.raises(RuntimeError, match="the compiled entropy epilogue failed: no C\\+\\+ compiler"):
        Projector(big, epilogue="compiled").stats(h)
