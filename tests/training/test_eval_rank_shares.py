"""In-training evaluation on several processes, each with its own vLLM engine (``RankShares``): every request is
generated once, by one rank, and every rank gets every completion back in request order, block by block."""

from __future__ import annotations

import threading

import pytest

from bupo.training.eval_callback import RankShares
from support.evaluation import ScriptedBackend, toy_rows


class _Engine:
    """A backend whose completion is a function of the request alone (as a seeded vLLM request's is)."""

    name = "vllm"

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.generated: list[tuple[str, int]] = []

    def generate(self, requests, settings, on_batch=None):
        self.generated.extend(requests)
        return [f"{p}#{s}" for p, s in requests]


def _all_gather(world: int):
    """``gather_object`` across ``world`` threads: every caller gets the concatenation in rank order."""
    barrier, slots = threading.Barrier(world), [None] * world

    def for_rank(rank: int):
        def gather(obj: list) -> list:
            slots[rank] = obj
            barrier.wait()
            out = [x for s in slots for x in s]
            barrier.wait()  # nobody overwrites its slot before everyone has read them
            return out
        return gather
    return for_rank


def _as_ranks(run, world: int) -> None:
    """``run(rank)`` on ``world`` threads at once (the ranks), until all return."""
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


@pytest.mark.parametrize("world, n", [(2, 11), (3, 7), (2, 1), (4, 24)])
def test_every_request_is_generated_once_and_every_rank_gets_all(world, n):
    requests = [(f"p{i // 2}", 100 + i) for i in range(n)]
    engines = [_Engine(batch_size=3) for _ in range(world)]
    gathers = _all_gather(world)
    results: dict[int, tuple[list, list]] = {}

    def run(rank: int) -> None:
        batches: list = []
        shares = RankShares(engines[rank], rank, world, gathers(rank))
        out = shares.generate(requests, None, lambda i, c: batches.append((i, c)))
        results[rank] = (out, batches)

    _as_ranks(run, world)
    expected = [f"{p}#{s}" for p, s in requests]
    for rank in range(world):
        out, batches = results[rank]
        assert out == expected
        assert [i for b, _ in batches for i in b] == list(range(n))  # on_batch sees each request once, in order
        assert all(len(b) <= 3 * world for b, _ in batches)  # a block: each rank's batch, not everything at once
        assert [c for _, cs in batches for c in cs] == expected
    generated = sorted(r for e in engines for r in e.generated)
    assert generated == sorted(requests)  # each request by exactly one rank
    assert all(len(e.generated) in (n // world, -(-n // world)) for e in engines)  # evenly shared
    assert RankShares(engines[0], 0, world, gathers(0)).name == "vllm"  # samples keyed as with one engine


def test_a_rank_that_returns_another_share_fails_loudly():
    def gather(obj):  # the other rank came back with nothing
        return obj

    with pytest.raises(RuntimeError, match=r"completions for 2 of the 4 requests came back"):
        RankShares(_Engine(batch_size=2), 0, 2, gather).generate([("p", s) for s in range(4)], None)


def test_lockstep_ranks_call_their_engine_in_every_block():
    """FSDP2 (forwards are collectives): a rank whose share of the last block is empty still generates once (the
    block's first request, dropped), so every rank runs the same number of generations; results are unchanged."""
    world, requests = 4, [("p", s) for s in range(7)]  # blocks of 2 x 4: [0..7], the last short: 3 ranks of 4
    engines = [_Engine(batch_size=2) for _ in range(world)]
    calls = [[] for _ in range(world)]
    for e, c in zip(engines, calls, strict=True):
        generate = e.generate
        e.generate = lambda reqs, settings, on_batch=None, _g=generate, _c=c: (_c.append(len(reqs)), _g(reqs, settings))[1]
    gathers = _all_gather(world)
    outs: dict[int, list] = {}

    def run(rank: int) -> None:
        outs[rank] = RankShares(engines[rank], rank, world, gathers(rank), lockstep=True).generate(requests, None)

    _as_ranks(run, world)
    assert all(outs[r] == [f"p#{s}" for s in range(7)] for r in range(world))
    assert calls == [[2], [2], [2], [1]]  # one block of 7: ranks 0-2 take 2, rank 3 one
    for c in calls:
        c.clear()
    outs.clear()
    requests = [("p", s) for s in range(9)]  # blocks [0..7], [8]: ranks 1-3 have nothing in the second
    _as_ranks(run, world)
    assert all(outs[r] == [f"p#{s}" for s in range(9)] for r in range(world))
    assert calls == [[2, 1], [2, 1], [2, 1], [2, 1]]  # each rank in every block
    assert sorted(engines[3].generated)[-1] == ("p", 8)  # rank 3's second call: the block's first request, dropped


def test_a_tensor_parallel_group_takes_one_share_and_calls_its_engine_together():
    """vLLM tensor parallelism (TRL's groups of consecutive ranks): 4 processes, groups of 2 -> 2 engines; both ranks
    of a group give their engine the same share, and every process still gets every completion once, in order."""
    from bupo.training import eval_callback

    requests = [(f"p{i}", i) for i in range(10)]
    engines = [_Engine(batch_size=2) for _ in range(4)]  # each process's handle on its group's engine
    gathers = _all_gather(4)
    outs: dict[int, list] = {}

    class _Acc:
        num_processes = 4

        def __init__(self, rank: int) -> None:
            self.process_index = rank

    def run(rank: int) -> None:
        trainer = type("T", (), {"accelerator": _Acc(rank)})()
        backend = eval_callback.shared(trainer, engines[rank], group=2)
        backend.gather = gathers(rank)  # threads as processes instead of a process group
        outs[rank] = backend.generate(requests, None)

    _as_ranks(run, 4)
    assert all(outs[r] == [f"p{i}#{i}" for i in range(10)] for r in range(4))
    assert engines[0].generated == engines[1].generated and engines[2].generated == engines[3].generated
    assert sorted(engines[0].generated + engines[2].generated) == requests  # the 2 engines share them
    with pytest.raises(ValueError, match="3 ranks per engine do not divide 4 processes"):
        eval_callback.shared(type("T", (), {"accelerator": _Acc(0)})(), engines[0], group=3)


def _broadcast(world: int):
    """``accelerate.utils.broadcast_object_list`` across ``world`` threads (rank 0 sends); each thread names its rank
    in ``rank_of``."""
    barrier, box, rank_of = threading.Barrier(world), [None], {}

    def broadcast(objects: list, from_process: int = 0) -> list:
        if rank_of[threading.get_ident()] == from_process:
            box[0] = list(objects)
        barrier.wait()
        objects[:] = box[0]
        barrier.wait()
        return objects
    return broadcast, rank_of


def test_a_resumed_evaluation_on_several_ranks_reuses_main_s_samples(tmp_path, monkeypatch):
    """A run stopped during an evaluation left part of its sample log in main's step folder. On the next run every
    rank resumes those samples (main's log and weights fingerprint sent to the others, each resuming from a private
    copy) and the ranks share out only the missing requests, each generated once; the scores are one process's."""
    import accelerate.utils

    from bupo.evaluation import evaluate
    from bupo.evaluation.samples import SAMPLES_FILE
    from bupo.training.eval_callback import shared_samples

    rows = toy_rows(5)
    kw = {"n": 3, "ks": [1, 2], "max_new_tokens": 8, "template": "octothinker", "model_id": "weights"}
    one = evaluate(None, None, {"amc2023": rows}, backend=ScriptedBackend(), out_dir=tmp_path / "one", **kw)
    lines = (tmp_path / "one" / SAMPLES_FILE).read_text().splitlines(keepends=True)
    step_dir = tmp_path / "run" / "step-000000"
    step_dir.mkdir(parents=True)
    (step_dir / SAMPLES_FILE).write_text("".join(lines[:6]) + lines[6][:20])  # 6 samples and a torn line

    world = 2
    broadcast, rank_of = _broadcast(world)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    engines, gathers = [ScriptedBackend() for _ in range(world)], _all_gather(world)
    results, folders = {}, {}

    def run(rank: int) -> None:
        rank_of[threading.get_ident()] = rank
        acc = type("Acc", (), {"num_processes": world, "is_main_process": rank == 0})()
        with shared_samples(acc, step_dir, "weights" if rank == 0 else None) as (folder, model_id):
            folders[rank] = folder
            backend = RankShares(engines[rank], rank, world, gathers(rank))
            results[rank] = evaluate(None, None, {"amc2023": rows}, backend=backend, out_dir=folder,
                                     **{**kw, "model_id": model_id})

    _as_ranks(run, world)
    assert folders[0] == step_dir and folders[1] != step_dir and not folders[1].exists()  # the copy is removed
    generated = sorted(seed for e in engines for seed in e.seen)  # one seed per request
    assert len(generated) == 15 - 6 == len(set(generated))  # only the missing (the torn one included), once each
    assert all(len(e.seen) in (4, 5) for e in engines)
    for rank in range(world):
        assert results[rank].metrics("eval") == one.metrics("eval")
    main_log = (step_dir / SAMPLES_FILE).read_text().splitlines()
    assert len([ln for ln in main_log if ln.endswith("}")]) == 15
