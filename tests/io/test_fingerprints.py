"""The hashers that now go through :func:`bupo.provenance.fingerprint` give the digests they gave before (a checkpoint
or a sample log written by an older bupo keeps matching the run that resumes it)."""

from __future__ import annotations

import hashlib
import json

from bupo.evaluation.backends import path_fingerprint
from bupo.training.resume import data_fingerprint


def _streamed_data_digest(prompts: list[str], answers: list[str]) -> str:
    """The training data's digest as it was computed before: one SHA-256 updated per (prompt, answer) pair."""
    h = hashlib.sha256()
    for prompt, gt in zip(prompts, answers, strict=True):
        h.update(prompt.encode("utf-8", "surrogatepass") + b"\0" + gt.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def test_data_fingerprint_keeps_its_digest():
    prompts, answers = ["What is 1 + 1?", "Lone surrogate \ud800 and é", ""], ["2", "x", "0"]
    got = data_fingerprint({"prompt": prompts, "ground_truth": answers})
    assert got == _streamed_data_digest(prompts, answers) and len(got) == 16
    # the pairs stay separated: moving text between a prompt and its answer changes the digest
    assert data_fingerprint({"prompt": ["ab"], "ground_truth": ["c"]}) != \
        data_fingerprint({"prompt": ["a"], "ground_truth": ["bc"]})
    assert data_fingerprint({"prompt": [], "ground_truth": []}) == hashlib.sha256(b"").hexdigest()[:16]


def test_path_fingerprint_keeps_its_digest(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 32)
    (tmp_path / "sub").mkdir()  # folders are not part of the identity
    h = hashlib.sha256(str(tmp_path.resolve()).encode())
    for f in sorted(tmp_path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(json.dumps([f.name, st.st_size, int(st.st_mtime)]).encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    before = path_fingerprint(tmp_path)
    assert before == h.hexdigest()[:16]
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # same size, other content
    assert path_fingerprint(tmp_path) != before
