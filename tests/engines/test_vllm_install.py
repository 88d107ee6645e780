"""The vLLM engine's install messages, version warning, backend choice and TRL contract (no vLLM needed: these run
in every venv, vLLM blocked where it is installed)."""

from __future__ import annotations

import inspect
import sys
import types
import warnings

import pytest

from bupo import engines
from bupo.cli import main


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, vllm_version() -> None


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_backend_vllm_without_vllm_names_the_cpu_and_gpu_installs(no_vllm, tmp_path, capsys, monkeypatch):
    import bupo.analysis.run as run

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(run, "load_model", no_model)
    for argv in (["eval", "--backend", "vllm", "--out", str(tmp_path / "e"), "--quiet"],
                 ["analyze", "--backend", "vllm", "--out", str(tmp_path / "a"), "--quiet"],
                 ["train", "--use_vllm", "true", "--max_steps", "1", "--out", str(tmp_path / "t")]):
        assert main(argv) == 2, argv
        err = _one_line(capsys)
        assert engines.INSTALL_CPU in err and engines.INSTALL_GPU in err, err
        assert "needs vLLM, which is not installed" in err


def test_backend_choice(no_vllm, monkeypatch):
    assert engines.resolve_backend("auto") == "hf" and engines.resolve_backend("vllm") == "vllm"
    assert "vLLM is not installed" in engines.backend_note("auto", "hf")
    monkeypatch.setattr(engines, "vllm_version", lambda: "0.31.0")
    assert engines.resolve_backend("auto") == "vllm" and engines.resolve_backend("hf") == "hf"
    assert engines.backend_note("auto", "vllm").startswith("generation: vLLM 0.31.0 (vLLM is installed")
    with pytest.raises(ValueError, match="accepted: auto, hf, vllm"):
        engines.resolve_backend("sglang")


def test_analyze_refuses_vllm_with_precomputed_traces(tmp_path, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text('{"prompt": "a", "response": "b"}\n')
    assert main(["analyze", "--traces", str(traces), "--backend", "vllm", "--out", str(tmp_path / "o")]) == 2
    assert "--traces brings its own" in _one_line(capsys)


def test_one_warning_outside_trls_range(monkeypatch):
    monkeypatch.setattr(engines, "_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        assert engines.warn_outside_range("0.31.0") is None and engines.warn_outside_range("0.22.0+cpu") is None
        for _ in range(2):
            text = engines.warn_outside_range("0.32.0")
        # TRL says the same from each module that checks the version; bupo's warning replaces them
        warnings.warn("TRL currently supports vLLM versions from 0.22.0 to 0.31.0. You have version 0.32.0", stacklevel=1)
        assert engines.warn_outside_range("0.21.1") is not None
    texts = [str(w.message) for w in seen]
    assert texts.count(text) == 1 and len(texts) == 2, texts
    assert "0.22.0 to 0.31.0" in text and "0.32.0" in text


def test_require_vllm_warns_once_for_a_version_outside_the_range(monkeypatch):
    monkeypatch.setattr(engines, "_warned", set())
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.33.0"))
    monkeypatch.setattr(engines, "vllm_version", lambda: "0.33.0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        engines.require_vllm()
        engines.require_vllm("--use_vllm true")
    assert len(seen) == 1 and "0.22.0 to 0.31.0" in str(seen[0].message)


def test_trl_contract_of_the_engine_hooks():
    """bupo's range is TRL's, and the names bupo swaps while TRL builds its colocated engine exist where it swaps them."""
    from trl import import_utils
    from trl.generation import vllm_generation
    from trl.trainer import grpo_trainer

    low, high = engines.VLLM_RANGE
    src = inspect.getsource(import_utils.is_vllm_available)
    assert f'Version("{low}") <= _vllm_base_version <= Version("{high}")' in src
    assert "self.llm = LLM(" in inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(grpo_trainer.GRPOTrainer.__init__)
    assert grpo_trainer.VLLMGeneration is vllm_generation.VLLMGeneration
    assert "self._iter_named_params()" in inspect.getsource(vllm_generation.VLLMGeneration.sync_weights)


def test_engine_settings_and_dtype(monkeypatch):
    from bupo.zoo import bundled_model_path

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert engines.engine_kwargs(on_cpu=False) == {}
    assert engines.engine_kwargs(on_cpu=True) == {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30,
                                                  "enable_chunked_prefill": False}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert engines.engine_kwargs(on_cpu=True)["kv_cache_memory_bytes"] == 3 << 30
    assert engines.checkpoint_dtype(bundled_model_path()) == "float32"


def test_gpu_engines_take_a_share_of_the_free_memory_not_of_the_whole_gpu(monkeypatch):
    """vLLM checks that gpu_memory_utilization x total is free at start-up: beside a model already on the GPU (bupo
    analyze) its default 0.9 failed; bupo asks for 0.9 of what is free."""
    import torch

    gib = 1 << 30
    assert engines.gpu_memory_kwargs((80 * gib, 80 * gib)) == {"gpu_memory_utilization": 0.9}  # an empty GPU
    share = engines.gpu_memory_kwargs((62 * gib, 80 * gib))["gpu_memory_utilization"]  # 16 GB model + context held
    assert share * 80 * gib <= 62 * gib and share == pytest.approx(0.9 * 62 / 80, abs=1e-4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.gpu_memory_kwargs() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * gib, 80 * gib))
    assert engines.gpu_memory_kwargs() == {"gpu_memory_utilization": 0.45}


def test_whole_prefills_get_a_budget_that_holds_the_context():
    trl_kw = {"max_model_len": None, "max_num_batched_tokens": 4096, "seed": 0}
    off = {**trl_kw, "enable_chunked_prefill": False}
    assert engines._whole_prefills(off, 8192)["max_num_batched_tokens"] == 8192  # SmolLM2's context > TRL's 4096
    assert engines._whole_prefills({**off, "max_model_len": 1024}, 8192)["max_num_batched_tokens"] == 4096
    assert engines._whole_prefills({**off, "max_model_len": 6000}, 8192)["max_num_batched_tokens"] == 6000
    assert "max_num_batched_tokens" not in engines._whole_prefills(off, None)  # vLLM sizes its own default
    assert engines._whole_prefills(trl_kw, 8192) == trl_kw  # a GPU: chunked prefill as TRL configures it


def test_training_engine_record():
    from types import SimpleNamespace

    assert engines.training_engine(SimpleNamespace(use_vllm=False))["engine"] == "hf"
    gpu = engines.training_engine(SimpleNamespace(use_vllm=True, vllm_mode="server"))
    assert gpu["engine"] == "vllm" and gpu["mode"] == "server"


def test_vllm_backend_needs_the_models_folder():
    from support.tiny_models import tiny_model

    with pytest.raises(ValueError, match="loads the model from its folder"):
        engines.model_folder(tiny_model("qwen3"))
