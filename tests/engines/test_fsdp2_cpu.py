"""FSDP2 under real sharding on the CPU: 2 gloo ranks, ``fully_shard`` as accelerate applies it (one unit per decoder
layer, the embedding, the [final norm, lm_head] tail, the root), DTensor parameters.

- Library paths (this file run as the worker under ``accelerate launch`` with the shipped ``fsdp2-cpu`` recipe,
  whose FSDP plugin bupo keeps on for CPU processes): the stream statistics, the internal-policy log-probs (the model's
  own truncated forward and TRL's fused LM head), the pre-flight health check and the lens table of the sharded
  model equal those of the unsharded one; no parameter is read as a shard (a DTensor in a plain matmul fails), and
  with bupo's completion TRL's fused head leaves no FSDP2 unit with a module that did not run its forward (without
  it lm_head is such a module: the "did not run forward before backward" warning of torch <= 2.12).
- ``bupo train`` under ``accelerate launch --config_file fsdp2-cpu.yaml`` (tests/support/launch_probe.py): both phases; after
  the internal step every rank's shards of the layers above k and the final norm are bitwise unchanged, the full step
  moves them with a fresh AdamW (first update = lr per element); no unit missed a forward and no such warning, in
  either phase; resuming from the checkpoint saved in the internal phase continues exactly; bupo_run.json records
  the sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.launchers import accelerate_cmd, launch, launcher_env, read_ranks, run_group, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("training")]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "fsdp2-cpu.yaml"
WARNING = "did not run forward before backward"


# ---------------------------------------------------------------------------------------------------------------
# the worker: run by accelerate launch, 2 CPU ranks


def _worker(out: str) -> None:
    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from bupo.analysis.health import quick_health
    from bupo.analysis.lens import lens_table
    from bupo.internal import internal_policy, layer_logprobs, stream_stats
    from bupo.training.launcher import complete_fused_lm_head, enable_cpu_fsdp2
    from bupo.zoo import bundled_model_path
    from support.launch_probe import MissedForward
    from support.tiny_models import random_batch, tiny_model

    torch.set_num_threads(1)
    missed = MissedForward()
    assert enable_cpu_fsdp2()
    acc = Accelerator(cpu=True)  # as bupo train on a machine without GPU (use_cpu)
    ref, model = tiny_model("qwen3", layers=4), tiny_model("qwen3", layers=4)  # the same weights (seeded)
    add_fused_lm_head(ref)
    add_fused_lm_head(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)  # the model is sharded in place: fully_shard per unit
    ids, mask = random_batch(ref, batch=2, seq=12)
    k, rec = 1, {"distributed_type": str(acc.distributed_type), "param_type": type(model.lm_head.weight).__name__}
    rec["units"] = sum(type(m).__name__.startswith("FSDP") for m in model.modules())
    with torch.no_grad():
        for proj in ("raw", "final_norm"):  # the first forward of the sharded model: nothing is unsharded yet
            got = stream_stats(model, ids, mask, streams=("resid_post", "mlp_in"), targets=ids, projection=proj)
            want = stream_stats(ref, ids, mask, streams=("resid_post", "mlp_in"), targets=ids, projection=proj)
            rec[f"stream_stats_{proj}"] = max(
                float((a - b).abs().max()) for key in want.stats for a, b in
                ((got.stats[key].entropy, want.stats[key].entropy), (got.stats[key].logprob, want.stats[key].logprob)))
            rec[f"stream_stats_{proj}_final"] = float((got.final.entropy - want.final.entropy).abs().max())
        want = layer_logprobs(ref, ids, mask, layer=k)
        rec["layer_logprobs"] = float((layer_logprobs(model, ids, mask, layer=k) - want).abs().max())
        labels = ids.clone()
        with internal_policy(model, k):  # what BuPOTrainer computes while internal: TRL's fused head, truncated
            fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        rec["fused_internal_logprobs"] = float((fused - want).abs().max())
        tok = AutoTokenizer.from_pretrained(bundled_model_path())
        prompts = ["What is 2 + 3?", "Name a prime number larger than ten."]
        h_got, h_want = (quick_health(m, tok, prompts) for m in (model, ref))
        rec["health"] = max(abs(a - b) for key in ("layer_entropy", "layer_logprob")
                            for a, b in zip(h_got[key], h_want[key], strict=True))
        rec["health_norm_gain"] = h_got["final_norm_gain_rms"] == pytest.approx(h_want["final_norm_gain_rms"])
        seq = ids[0].tolist()
        rec["lens_equal"] = lens_table(model, tok, seq, positions=[-1, 4]) == lens_table(ref, tok, seq, positions=[-1, 4])
    missed.take()
    for phase in ("without", "with"):  # a training step on TRL's fused head, before and after bupo's completion
        if phase == "with":
            from types import SimpleNamespace

            rec["completed"] = complete_fused_lm_head(SimpleNamespace(accelerator=acc, is_fsdp_enabled=True,
                                                                      model=model))
        with internal_policy(model, k):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss
        loss.backward()
        opt.zero_grad()
        rec[f"missed_{phase}"] = missed.take()
    with open(os.path.join(out, f"worker-rank{acc.process_index}.json"), "w") as f:
        json.dump(rec, f)


def test_sharded_library_paths_equal_unsharded_and_read_no_shard(tmp_path):
    cmd = [*accelerate_cmd(RECIPE), str(Path(__file__)), str(tmp_path)]
    proc = run_group(cmd, env=launcher_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rec in read_ranks(tmp_path, "worker"):
        assert rec["distributed_type"] == "DistributedType.FSDP" and rec["param_type"] == "DTensor"
        assert rec["units"] == 4 + 1 + 2 + 1  # 4 decoder layers, the embedding, the [norm, lm_head] tail, the root
        for key in ("stream_stats_raw", "stream_stats_final_norm", "stream_stats_raw_final",
                    "stream_stats_final_norm_final", "layer_logprobs", "fused_internal_logprobs", "health"):
            assert rec[key] < 1e-5, (key, rec[key])
        assert rec["health_norm_gain"] and rec["lens_equal"]
        assert rec["missed_without"] == ["Linear"]  # TRL's fused head reads lm_head.weight, never runs lm_head
        assert rec["completed"] and rec["missed_with"] == []
    assert WARNING not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# bupo train under the fsdp2-cpu recipe


def _run(probe_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # the bundled model (tied embeddings: the tail unit is [final norm, embedding, lm_head]), k = 3 of 8 layers;
    # 0/1 alternating rewards: every group has non-zero advantages, so every step updates; an evaluation before
    # training and after every step (generation under no_grad: FSDP2 reuses the full-parameter buffers it allocates
    # first, and ones allocated under inference mode stopped the next training forward)
    args = [a if a != "none" else "bundled" for a in train_args(out, completion_tokens=32)]  # --eval-data bundled
    return launch(RECIPE, probe_dir, [*args, "--eval_rows", "4", "--eval_samples", "2", "--eval_every", "1", *extra],
                  timeout=400, env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))


def test_bupo_train_fsdp2_cpu_recipe_shards_both_phases_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _run(tmp_path / "p1", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert WARNING not in proc.stderr
    ranks = read_ranks(tmp_path / "p1")
    for rec in ranks:
        assert rec["world_size"] == 2 and rec["param_type"] == "DTensor"
        assert rec["wrapped"] == "FSDPQwen3ForCausalLM"
        assert rec["parity"]["max_abs"] < 1e-5 < rec["parity"]["ref_vs_full_mean_abs"]  # pi^k, not pi
        s1, s2 = rec["steps"]["1"], rec["steps"]["2"]
        assert s1["internal"] and not s2["internal"]
        assert s1["upper_same"] and not s1["lower_same"]  # internal: this rank's shards above k bitwise unchanged
        assert s1["n_upper"] == 4 * 11 + 1  # layers 4..7 (11 tensors each) + the final norm
        assert not s2["upper_same"]  # after the switch they train
        assert s1["missed_forward"] == [] and s2["missed_forward"] == []  # lm_head ran its forward in both phases
        assert rec["first_full_update"]["step"] == 2
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)  # AdamW step 1
    assert ranks[0]["logs"] == ranks[1]["logs"] and [h["bupo/phase"] for h in ranks[0]["logs"]] == [1.0, 0.0]
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["global_step"] == 2
    sharding = summary["sharding"]
    assert sharding["launcher"] == "fsdp2" and sharding["world_size"] == 2 and sharding["device"] == "cpu"
    assert sharding["param_type"] == "DTensor" and sharding["fsdp_units"] == 8 + 4  # layers, embed, norm, head, root
    assert "Qwen3DecoderLayer" in sharding["fsdp_unit_types"]
    assert [e["step"] for e in summary["evals"]] == [0, 1, 2]
    for r in range(2):  # 4 problems x 2 samples: each rank generates 4, the ranks stepping together (synced)
        assert json.loads((tmp_path / "p1" / f"eval-rank{r}.json").read_text())["requests"] == [4, 4, 4]

    # resume from the checkpoint saved while internal: its optimizer has no state for the layers above k
    proc = _run(tmp_path / "p2", out, "--resume", str(out / "checkpoint-1"), "--overwrite")  # checkpoint-2 goes
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert WARNING not in proc.stderr
    for rec, first in zip(read_ranks(tmp_path / "p2"), ranks, strict=True):
        assert rec["start_step"] == 1 and rec["global_step"] == 2 and list(rec["steps"]) == ["2"]
        assert not rec["steps"]["2"]["internal"] and not rec["steps"]["2"]["upper_same"]
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)
        # the same full step as without the interruption (log_history holds the checkpoint's step 1 too), the
        # layer-entropy probe included: each rank resumes with its own probe batch
        step2 = first["logs"][-1]
        assert "bupo/layer_entropy/final" in step2
        assert {k: rec["logs"][-1][k] for k in step2} == pytest.approx(step2, rel=1e-4, abs=1e-6)
    assert json.loads((out / "bupo_run.json").read_text())["resumed_from"] == str(out / "checkpoint-1")


def test_bupo_train_fsdp2_cpu_with_lora_measures_its_probes(tmp_path):
    """LoRA under FSDP2: the root unit is PEFT's PeftModel, and the probes run the HF model inside it (no root hooks):
    the root's own parameters must be unsharded for them (they stayed shards: "mixed torch.Tensor and DTensor", the
    layer-entropy probe and the adaptive switch's signals disabled themselves)."""
    out = tmp_path / "run"
    args = train_args(out, completion_tokens=16)
    args[args.index("--internal-steps") + 1] = "auto"
    proc = launch(RECIPE, tmp_path / "p", [*args, "--internal-steps-max", "1", "--use_peft", "true", "--lora_r", "8"],
                  timeout=400, env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "probe disabled" not in proc.stderr, proc.stderr[-3000:]
    run = json.loads((out / "bupo_run.json").read_text())
    assert run["peft"] == "lora" and run["sharding"]["launcher"] == "fsdp2"
    assert run["switch"]["step"] == 2 and len(run["switch"]["trace"]) == 2  # the signals measured at both steps
    for rec in read_ranks(tmp_path / "p"):
        assert [("bupo/layer_entropy/final" in h) for h in rec["logs"]] == [True, True]


def test_layers_only_arm_under_fsdp2_holds_the_upper_shards_while_internal(tmp_path):
    """The layers-only control arm (``internal_objective='full'``: the full policy's loss, the internal phase's holds)
    freezes parameters after FSDP2 wrapped them: while internal, every rank's shards above k stay bitwise unchanged,
    after the switch they move with a fresh AdamW step."""
    proc = launch(RECIPE, tmp_path / "p", [*train_args(tmp_path / "run", completion_tokens=16), "--internal_objective",
                                           "full"], timeout=400, env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rec in read_ranks(tmp_path / "p"):
        s1, s2 = rec["steps"]["1"], rec["steps"]["2"]
        assert s1["internal"] and s1["upper_same"] and not s1["lower_same"]
        assert not s2["internal"] and not s2["upper_same"]
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)


def test_one_layer_arm_under_fsdp2_trains_its_layer_alone(tmp_path):
    """The one-layer arm (``--train_layer j``: GRPO with every parameter but decoder layer j frozen before the
    optimizer is built) under FSDP2: only layer j's shards move on each rank; the final norm and the other layers stay
    bitwise unchanged."""
    args = train_args(tmp_path / "run", completion_tokens=16)
    args[args.index("--algo") + 1] = "grpo"
    i = args.index("--internal-steps")
    del args[i : i + 2]
    proc = launch(RECIPE, tmp_path / "p", [*args, "--train_layer", "2"], timeout=400,
                  env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "bupo_run.json").read_text())["arm"] == "one-layer"
    for rec in read_ranks(tmp_path / "p"):
        for step in ("1", "2"):
            s = rec["steps"][step]
            assert s["moved_layers"] == [2] and s["upper_same"] and not s["internal"], s  # (upper: layers 4-7, norm)


def test_progressive_schedule_under_fsdp2_moves_only_the_layers_up_to_each_k(tmp_path):
    """``--internal_schedule 1:1,3:1`` (pi^1 for one rollout step, then pi^3, then the full policy) under FSDP2: each
    rank's shards move layer by layer as k rises (layers <= 1, then <= 3, then all), with a fresh AdamW at the end."""
    args = train_args(tmp_path / "run", completion_tokens=16)
    for flag in ("--internal-steps", "--internal-layer"):
        i = args.index(flag)
        del args[i : i + 2]
    args[args.index("--max_steps") + 1] = "3"
    proc = launch(RECIPE, tmp_path / "p", [*args, "--internal_schedule", "1:1,3:1"], timeout=400,
                  env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "bupo_run.json").read_text())["switch"]["step"] == 3
    for rec in read_ranks(tmp_path / "p"):
        steps = rec["steps"]
        assert [steps[s]["internal"] for s in ("1", "2", "3")] == [True, True, False]
        assert [steps[s]["moved_layers"] for s in ("1", "2", "3")] == [[0, 1], [0, 1, 2, 3], list(range(8))]
        assert all(steps[s]["missed_forward"] == [] for s in steps)
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)


def test_bf16_mixed_precision_and_gradient_checkpointing_under_fsdp2(tmp_path):
    """The paper presets' precision on FSDP2 (``--bf16 true``: accelerate's bf16 mixed precision, fp32 shards) with
    gradient checkpointing: the trainer's internal log-probs are pi^k's within bf16 rounding, the shards above k stay
    bitwise unchanged while internal (fp32 masters included), no unit misses a forward through the recomputation, and
    the first full-phase update is a fresh AdamW step."""
    out = tmp_path / "run"
    args = [a if a != "none" else "bundled" for a in train_args(out, completion_tokens=16)]  # --eval-data bundled
    # 3 evaluation requests in blocks of 2 (one per rank): the last block leaves rank 1 without a request, and it
    # must still step with rank 0 (an FSDP2 forward is a collective)
    proc = launch(RECIPE, tmp_path / "p", [*args, "--bf16", "true", "--gradient_checkpointing", "true",
                                           "--eval_rows", "3", "--eval_samples", "1", "--eval_batch_size", "1"],
                  timeout=400, env=launcher_env(BUPO_PROBE_ALTERNATING_REWARD="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert WARNING not in proc.stderr
    run = json.loads((out / "bupo_run.json").read_text())
    sharding = run["sharding"]
    assert sharding["mixed_precision"] == "bf16" and sharding["param_type"] == "DTensor"
    assert [(e["step"], e["generation"]) for e in run["evals"]] == [(0, "hf"), (2, "hf")]
    for r in range(2):  # each evaluation: one request per rank per block, rank 1's second a dropped repeat
        assert json.loads((tmp_path / "p" / f"eval-rank{r}.json").read_text())["requests"] == [1, 1] * 2
    assert len((out / "evals" / "step-000002" / "samples.jsonl").read_text().splitlines()) == 3
    for rec in read_ranks(tmp_path / "p"):
        parity = rec["parity"]  # bf16 compute against the fp32 reference: rounding, far below pi^k vs pi
        assert parity["mean_abs"] < 0.05 * parity["ref_vs_full_mean_abs"], parity
        s1, s2 = rec["steps"]["1"], rec["steps"]["2"]
        assert s1["internal"] and s1["upper_same"] and s1["watched_master_same"] and not s1["lower_same"]
        assert not s2["internal"] and not s2["upper_same"]
        assert s1["missed_forward"] == [] and s2["missed_forward"] == []
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without destructors: tearing down gloo process groups at exit can abort on torch 2.13 CPU
