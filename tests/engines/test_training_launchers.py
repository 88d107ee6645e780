"""Real launchers on the CPU: ``accelerate launch`` with the shipped configs, 2 processes on gloo,
running ``bupo train`` end to end through both phases (tests/support/launch_probe.py adds one recording callback).

- src/bupo/recipes/accelerate/cpu.yaml (DDP): ranks agree on the logged metrics, every rank's layers above k and final norm
  are bitwise unchanged after the internal phase and move after the switch; resuming from the checkpoint at the
  phase boundary continues in the full phase.
- an FSDP config on the CPU: accelerate enables FSDP only on GPU-like devices, so the run would silently be DDP.
  bupo train keeps FSDP2 on for CPU processes (tests/engines/test_fsdp2_cpu.py, recipe fsdp2-cpu); FSDP1 has no CPU path and
  is refused in one line. ZeRO-3 and FSDP2 on a GPU: benchmarks/gpu_check.py launchers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.launchers import launch, one_process_samples, read_ranks, samples_by_request, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("training")]

def test_accelerate_ddp_config_runs_both_phases_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = train_args(out)
    args[args.index("--eval-data") + 1] = "bundled"
    proc = launch("cpu.yaml", tmp_path / "p1", [*args, "--eval_rows", "4", "--eval_samples", "2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # the evaluations: each rank generated half of the requests with its model (transformers), every rank scored all
    evals = json.loads((out / "bupo_run.json").read_text())["evals"]
    assert [(e["step"], e["generation"]) for e in evals] == [(0, "hf"), (2, "hf")]
    _same_samples_as_one_process(out / "evals" / "step-000000")
    for r in range(2):  # 2 evaluations of 8 requests: 4 a rank each time
        assert json.loads((tmp_path / "p1" / f"eval-rank{r}.json").read_text())["requests"] == [4, 4]
    ranks = read_ranks(tmp_path / "p1")
    for rec in ranks:
        assert rec["world_size"] == 2 and rec["wrapped"] == "DistributedDataParallel"
        assert rec["steps"]["1"]["internal"] and not rec["steps"]["2"]["internal"]
        assert rec["steps"]["1"]["upper_same"] and not rec["steps"]["1"]["lower_same"]  # internal: only <= k moves
        assert not rec["steps"]["2"]["upper_same"]  # after the switch everything trains
        assert rec["steps"]["1"]["n_upper"] == 4 * 11 + 1  # layers 4..7 (11 tensors each) + the final norm
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)  # fresh AdamW
    assert ranks[0]["logs"] == ranks[1]["logs"] and [h["bupo/phase"] for h in ranks[0]["logs"]] == [1.0, 0.0]
    summary = json.loads((out / "bupo_run.json").read_text())
    assert summary["global_step"] == 2 and (out / "checkpoint-1").is_dir()
    assert proc.stdout.count(f"outputs in {out}") == 1, proc.stdout[-2000:]  # the run's last line, from rank 0 only

    # resume from the checkpoint at the phase boundary: the next rollout step is the full phase
    proc = launch("cpu.yaml", tmp_path / "p2", [*train_args(out), "--resume", str(out / "checkpoint-1"),
                                                "--overwrite"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rec in read_ranks(tmp_path / "p2"):
        assert rec["start_step"] == 1 and rec["global_step"] == 2 and rec["world_size"] == 2
        assert list(rec["steps"]) == ["2"] and not rec["steps"]["2"]["internal"]
        assert rec["first_full_update"]["median_update_over_lr"] == pytest.approx(1.0, abs=0.02)
    assert json.loads((out / "bupo_run.json").read_text())["resumed_from"] == str(out / "checkpoint-1")


def test_a_ddp_run_stopped_during_its_evaluation_resumes_the_samples_main_wrote(tmp_path):
    """The same command again, after a stop during the evaluation before training: every rank resumes the samples
    main had written (main sends them), the ranks generate only the missing requests, and the samples are those of
    an uninterrupted run."""
    def run(out, probe):
        args = train_args(out)
        args[args.index("--eval-data") + 1] = "bundled"
        args[args.index("--max_steps") + 1] = "1"
        proc = launch("cpu.yaml", probe, [*args, "--eval_rows", "4", "--eval_samples", "2"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return [json.loads((probe / f"eval-rank{r}.json").read_text())["requests"] for r in range(2)]

    whole = run(tmp_path / "whole", tmp_path / "p1")
    assert whole == [[4, 4], [4, 4]]  # before training and at the end: 8 requests, 4 a rank
    step0 = Path("evals") / "step-000000" / "samples.jsonl"
    lines = (tmp_path / "whole" / step0).read_text().splitlines(keepends=True)
    (tmp_path / "again" / step0).parent.mkdir(parents=True)
    (tmp_path / "again" / step0).write_text("".join(lines[:3]))  # what main wrote before the stop
    again = run(tmp_path / "again", tmp_path / "p2")
    assert sum(r[0] for r in again) == 5 and all(r[0] >= 2 for r in again)  # only the 5 missing, shared
    assert [r[1] for r in again] == [4, 4]
    assert (samples_by_request((tmp_path / "again" / step0).parent)
            == samples_by_request((tmp_path / "whole" / step0).parent))


def test_accelerate_fsdp1_config_on_cpu_is_refused_not_silently_ddp(tmp_path):
    proc = launch("fsdp2.yaml", tmp_path / "p", train_args(tmp_path / "run"), "--num_processes", "2",
                   "--mixed_precision", "no", "--fsdp_version", "1")
    assert proc.returncode != 0
    assert "the accelerate config asks for FSDP, but accelerate did not enable it" in proc.stderr
    assert not (tmp_path / "run" / "bupo_run.json").exists()


def _same_samples_as_one_process(step_dir):
    """2 DDP ranks, each generating every other request of the evaluation before training, gave the samples one
    process gives the same requests (each request has its own seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.evaluation.backends import HFBackend
    from bupo.zoo import bundled_model_path

    tok = AutoTokenizer.from_pretrained(bundled_model_path(), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path())
    shared = samples_by_request(step_dir)
    one = one_process_samples(step_dir, HFBackend(model, tok), tok, rows=4, samples=2)
    assert len(shared) == 8 and shared == one and len(set(one.values())) > 1
