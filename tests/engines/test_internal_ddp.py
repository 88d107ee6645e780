"""The internal-policy context manager under 2-process DDP (gloo, CPU)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bupo.internal import internal_policy, layer_logits, parts
from support.tiny_models import random_batch, tiny_model

K = 1


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: no interface/hostname lookups
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        model = tiny_model("qwen3", tie=True, layers=4).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        ids, mask = random_batch(model, seed=10 + rank)
        with internal_policy(ddp, K):
            logits = ddp(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.log_softmax(logits, -1).mean().backward()  # DDP all-reduces grads here
        p = parts(model)
        torch.save(
            {
                "logits": logits.detach(),
                "grads_none_above_k": [all(q.grad is None for q in p.layers[la].parameters()) for la in range(4)],
                "norm_grad_none": all(q.grad is None for q in p.final_norm.parameters()),
                "embed_grad": p.embed.weight.grad.clone(),
                "num_layers_after": model.config.num_hidden_layers,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()
        # results are on disk: leave without running destructors. Freeing the DDP reducer joins a gloo thread that
        # waits for the GIL the freeing thread holds (a deadlock seen once in ~10 runs, torch 2.13 CPU).
        os._exit(0)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_internal_policy_under_two_process_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = tiny_model("qwen3", tie=True, layers=4)
    for rank, res in enumerate(results):
        ids, mask = random_batch(model, seed=10 + rank)
        ref = layer_logits(model, ids, mask, layer=K)
        assert torch.allclose(res["logits"], ref, atol=1e-5)
        assert res["grads_none_above_k"] == [False, False, True, True]
        assert res["norm_grad_none"]
        assert res["num_layers_after"] == 4
    # gradients were all-reduced across the two ranks
    assert torch.allclose(results[0]["embed_grad"], results[1]["embed_grad"])
