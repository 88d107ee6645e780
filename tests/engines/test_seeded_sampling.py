"""bupo's seeded sampling for vLLM's CPU backend (:mod:`bupo.seeded_sampling`), without vLLM: the race samples the
given distribution, one independent stream per row, and batches that are not fully seeded go to vLLM's own code.
(With a real engine: tests/engines/test_vllm_engines.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from bupo.seeded_sampling import U_FLOOR, _seeded_forward, exponential_race


def _draws(probs: list[float], n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([probs], dtype=torch.float32)
    return [int(exponential_race(p.clone(), {0: g})[0]) for _ in range(n)]


def test_the_race_samples_the_distribution():
    probs = [0.5, 0.25, 0.15, 0.07, 0.03, 0.0]
    n = 20000
    counts = torch.bincount(torch.tensor(_draws(probs, n, seed=1)), minlength=len(probs)).tolist()
    assert counts[-1] == 0  # a zero-probability token is never drawn
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts[:-1], probs[:-1], strict=True))
    assert chi2 < 20.5, (counts, chi2)  # 4 degrees of freedom: P(chi2 > 20.5) < 4e-4 for a correct sampler
    # the test has power: a sampler that drew from the squared (sharpened) distribution fails it
    sharp = [p * p / sum(q * q for q in probs) for p in probs[:-1]]
    assert sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts[:-1], sharp, strict=True)) > 1000


def test_each_row_has_its_own_stream():
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=-1)

    def run(rows: list[int], seeds: list[int]) -> list[int]:
        gens = {j: torch.Generator().manual_seed(s) for j, s in enumerate(seeds)}
        out = [exponential_race(probs[rows].clone(), gens).tolist() for _ in range(30)]
        return [[step[j] for step in out] for j in range(len(rows))]

    together = run([0, 1, 2, 3], [10, 11, 12, 13])
    assert together == run([0, 1, 2, 3], [10, 11, 12, 13])  # the same seeds: the same tokens, step after step
    assert run([2], [12]) == [together[2]]  # a row alone draws what it drew in the batch
    assert run([3, 0], [13, 10]) == [together[3], together[0]]
    assert together[0] != run([0], [99])[0]  # another seed, other tokens


def test_rows_without_a_generator_are_refused():
    with pytest.raises(ValueError, match="one generator per row: 2 rows"):
        exponential_race(torch.full((2, 3), 1 / 3), {0: torch.Generator()})


def test_noise_is_never_zero_nor_infinite():
    # the floor turns U = 0 (probability 2^-24 per draw in float32) into E = 17.3, not infinity
    assert math.isfinite(-math.log(U_FLOOR)) and -math.log(U_FLOOR) > 17
    assert 0.0 < U_FLOOR < 2.0**-24


class _Sampler:
    logprobs_mode = "raw_logprobs"
    use_fp64_gumbel = False


@pytest.mark.parametrize("case", ["unseeded", "mixed", "fp64"])
def test_batches_not_fully_seeded_go_to_vllms_own_sampler(case):
    calls = []
    sampler = _Sampler()
    if case == "fp64":
        sampler.use_fp64_gumbel = True
    gens = {"unseeded": {}, "mixed": {1: torch.Generator()}, "fp64": {0: torch.Generator(), 1: torch.Generator()}}
    out = _seeded_forward(sampler, lambda *a: calls.append(a) or ("vllm", None), torch.zeros(2, 5), gens[case],
                          None, None)
    assert out == ("vllm", None) and len(calls) == 1
