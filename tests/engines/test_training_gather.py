"""``full_params``: the forwards bupo train runs outside TRL's training step (the pre-flight health check, the
auto-layer analysis) see full weights under DeepSpeed ZeRO-3, and nothing changes without it.

DeepSpeed is not installed here: a fake ``deepspeed`` module reproduces what ZeRO-3 does to a model (each parameter
an empty shard outside ``GatheredParameters``, so a forward fails as it does on a real partitioned model)."""

from __future__ import annotations

import enum
import json
import os
import sys
import types
from contextlib import contextmanager

import pytest
import torch

from bupo.internal.sharding import is_sharded
from bupo.training.gather import full_params
from support.training import char_tokenizer, make_model

ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "reward_model": {"ground_truth": str(2 * i)}}
        for i in range(4)]


class FakeZero3:
    """ZeRO-3's effect on ``model``: parameters tagged with ``ds_id`` and empty outside ``GatheredParameters``."""

    def __init__(self, model):
        self.full = {}
        self.gathers: list[tuple[int, object]] = []
        self.inside = False
        self.status = enum.Enum("ZeroParamStatus", ["AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"])
        for i, p in enumerate(model.parameters()):
            p.ds_id = i
            p.ds_status = self.status.NOT_AVAILABLE
            p.ds_shape = p.shape
            self.full[i] = p.data
            p.data = torch.empty(0, dtype=p.dtype)
        self.module = types.ModuleType("deepspeed")
        self.module.zero = types.SimpleNamespace(GatheredParameters=self.gathered)
        self.submodules = {"deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
                           "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
                           "deepspeed.runtime.zero.partition_parameters":
                               types.SimpleNamespace(ZeroParamStatus=self.status)}

    @contextmanager
    def gathered(self, params, modifier_rank=None):
        self.gathers.append((len(params), modifier_rank))
        for p in params:
            p.data = self.full[p.ds_id]
            p.ds_status = self.status.AVAILABLE
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)
                p.ds_status = self.status.NOT_AVAILABLE


@pytest.fixture
def zero3(monkeypatch):
    model = make_model()
    fake = FakeZero3(model)
    monkeypatch.setitem(sys.modules, "deepspeed", fake.module)
    for name, module in fake.submodules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return model, fake


def test_full_params_is_a_no_op_without_zero3(monkeypatch):
    model = make_model()
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it would fail: the no-op path must not
    before = [p.data_ptr() for p in model.parameters()]
    assert not is_sharded(model)
    with full_params(model) as m:
        assert m is model
        assert m(torch.tensor([[1, 5, 6]])).logits.shape[-1] == model.config.vocab_size
    assert [p.data_ptr() for p in model.parameters()] == before


def test_full_params_gathers_zero3_shards_for_the_block(zero3):
    model, fake = zero3
    ids = torch.tensor([[1, 5, 6]])
    assert is_sharded(model)
    with pytest.raises(RuntimeError):  # a partitioned model cannot run a forward
        model(ids)
    with full_params(model) as m:
        assert m is model and m(ids).logits.shape == (1, 3, model.config.vocab_size)
    assert fake.gathers == [(len(list(model.parameters())), None)]  # every parameter, read-only
    assert all(p.numel() == 0 for p in model.parameters())  # sharded again afterwards


def test_the_preflight_health_check_runs_on_gathered_params(zero3):
    from bupo.training.layer import check_internal_policy

    model, fake = zero3
    check = check_internal_policy(model, char_tokenizer(), ROWS, "chat", 1, "raw")
    assert check["layer"] == 1 and check["entropy"] > 0 and len(fake.gathers) == 1


@pytest.mark.parametrize("is_main", [True, False])
def test_the_auto_layer_analysis_runs_on_gathered_params_and_every_process_gathers(zero3, tmp_path, monkeypatch,
                                                                                  is_main):
    import bupo.analysis.run as analysis_run
    from bupo.training.layer import resolve_internal_layer

    model, fake = zero3
    seen = []

    def fake_analyze(model, tokenizer, *, out_dir, **kw):
        seen.append(fake.inside)
        model(torch.tensor([[1, 5, 6]]))  # a forward: fails unless the weights are gathered
        out_dir.mkdir(parents=True)
        (out_dir / "summary.json").write_text(json.dumps({"num_layers": 4, "suggested_internal_layer": 2}))

    monkeypatch.setattr(analysis_run, "analyze", fake_analyze)
    if not is_main:  # the main process wrote the analysis meanwhile
        import bupo.analysis.result as analysis_result

        monkeypatch.setattr(analysis_result, "suggested_layer", lambda path, projection: 2)
    k, source = resolve_internal_layer("auto", model=model, tokenizer=None, model_path=None,
                                       output_dir=str(tmp_path), analysis=None, rows=ROWS, template="chat",
                                       samples=4, max_new_tokens=4, is_main=is_main)
    assert k == 2 and "run by bupo train" in source
    assert seen == ([True] if is_main else []) and len(fake.gathers) == 1


def test_a_single_process_run_gets_a_free_master_port_and_a_launcher_keeps_its_own(monkeypatch):
    import socket

    from bupo.training.launcher import single_process_master_port

    for k in ("MASTER_PORT", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    port = single_process_master_port()
    assert port is not None and port != "29500" and os.environ["MASTER_PORT"] == port
    with socket.socket() as s:  # free: it can be bound
        s.bind(("127.0.0.1", int(port)))
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert single_process_master_port() is None and os.environ["MASTER_PORT"] == "12345"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: the launcher's rendezvous, not a local choice
    assert single_process_master_port() is None and "MASTER_PORT" not in os.environ
