"""``benchmarks/gpu_check.py quick --small``: the GPU check's own code (core's checks, then ``accelerate launch`` of
``bupo train`` with the launch probe's verdicts) on tiny shapes on the CPU, so the script a lent GPU machine runs
(``bash benchmarks/gpu_check.sh``) does not rot between the sessions that have one."""

from __future__ import annotations

import json
import sys

import pytest

from support.launchers import ROOT, launcher_env, run_group

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("training")]


def test_gpu_check_quick_dry_run_passes_every_check(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "quick", "--small", "--out", str(tmp_path)]
    proc = run_group(cmd, env=launcher_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    core = json.loads((tmp_path / "gpu_core.json").read_text())
    launchers = json.loads((tmp_path / "gpu_launchers.json").read_text())
    assert core["ok"] and launchers["ok"]
    names = [c["check"] for c in launchers["checks"]]
    for want in ("bupo train ran to the end", "internal log-probs equal the unsharded reference",
                 "bitwise unchanged", "no FSDP unit missed a forward", "fresh AdamW step 1",
                 "records the sharding", "evaluations at steps 0, 1, 2"):
        assert any(want in n for n in names), (want, names)
    run = launchers["runs"]["fsdp2"]
    assert run["timeout"] < 285 and run["summary"]["sharding"]["param_type"] == "DTensor"  # core's time came off
    assert "== core: PASS" in proc.stdout and "== launchers: PASS" in proc.stdout
