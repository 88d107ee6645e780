"""README and docs code: every ```python block runs as pasted; docs name no file users do not have; the
top-level API is importable and ``import bupo`` stays cheap."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# notes that live outside the package (the project's working notes); users never get them
PRIVATE = re.compile(r"\.\./shared|/shared/|\blens\.md|\bengine\.md|\bpaper\.md|rl-engine")


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


WITH_CODE = [p for p in DOCS if _blocks(p)]


def test_the_docs_have_python_examples():
    assert {p.name for p in WITH_CODE} >= {"README.md", "analysis.md", "evaluation.md", "internal.md"}


RUNNER = """
import os, sys, traceback
failed = []
for name, code in BLOCKS:
    os.makedirs(name, exist_ok=True)
    os.chdir(name)  # each file in its own empty folder, as a user would paste it
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except Exception:
        failed.append(name)
        traceback.print_exc()
    os.chdir("..")
sys.exit(f"failed: {failed}" if failed else 0)
"""


def test_python_blocks_run_as_pasted(tmp_path):
    """Each file's blocks run in order in a fresh namespace and folder; one interpreter for all (imports are slow)."""
    blocks = [(p.name, "\n\n".join(_blocks(p))) for p in WITH_CODE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", f"BLOCKS = {blocks!r}\n{RUNNER}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "analysis.md" / "runs" / "cmp").is_dir()  # the examples really ran


def test_no_doc_or_source_names_a_file_users_do_not_have():
    files = [*DOCS, *(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.md"), *(ROOT / "src").rglob("*.yaml")]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "\n".join(hits)


def test_relative_links_in_the_docs_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = [f"{p.name}: {target}" for p in DOCS for target in link.findall(p.read_text(encoding="utf-8"))
              if "://" not in target and not (p.parent / target).exists()]
    assert not broken, broken


def test_top_level_api_is_lazy_and_complete():
    # laziness needs a fresh interpreter; the exports resolve here, where torch and TRL are loaded once per worker
    code = ("import sys, bupo; heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "assert set(bupo.__all__) == {*bupo._EXPORTS, '__version__'}, bupo.__all__; "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    import bupo
    import bupo.analysis
    import bupo.evaluation
    import bupo.internal
    import bupo.training
    from bupo import BuPOConfig, BuPOTrainer, analyze, evaluate, internal_policy, layer_logits

    assert BuPOTrainer is bupo.training.BuPOTrainer and analyze is bupo.analysis.analyze
    assert evaluate is bupo.evaluation.evaluate and layer_logits is bupo.internal.layer_logits
    assert BuPOConfig is bupo.training.BuPOConfig and internal_policy is bupo.internal.internal_policy
    for name, module in bupo._EXPORTS.items():  # the lazy lookup itself, even where an earlier test cached a name
        assert bupo.__getattr__(name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bupo.nope  # noqa: B018
