"""The one staging/resume helper (bupo.io.Staging) and the one versions/fingerprint helper (bupo.provenance)."""

from __future__ import annotations

import json
import os

import pytest

from bupo.io import Staging
from bupo.provenance import fingerprint, model_fingerprint, versions


def _assemble(st: Staging, files: dict[str, str]) -> None:
    for name, text in files.items():
        (st.output / name).write_text(text)


def test_partial_work_is_kept_only_for_the_same_fingerprint(tmp_path):
    st = Staging(tmp_path, name=".partial", fingerprint="aaa")
    assert not st.resumed and st.dir == tmp_path / ".partial" and st.output.is_dir()
    st.write_json("cache.json", {"x": 1})
    again = Staging(tmp_path, name=".partial", fingerprint="aaa")
    assert again.resumed and again.read_json("cache.json") == {"x": 1}
    off = Staging(tmp_path, name=".partial", fingerprint="aaa", resume=False)
    assert not off.resumed and off.read_json("cache.json") is None  # resume off: the old work is gone
    off.write_json("cache.json", {"x": 2})
    other = Staging(tmp_path, name=".partial", fingerprint="bbb")
    assert not other.resumed and other.read_json("cache.json") is None  # other inputs: never mixed in
    never = Staging(tmp_path, name=".partial", fingerprint=None)
    assert not never.resumed and not (never.dir / Staging.FINGERPRINT_FILE).exists()


def test_publish_replaces_the_output_as_a_whole_marker_last(tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text("old")
    (tmp_path / "figure.png").write_text("old")
    (tmp_path / "mine.txt").write_text("not an output")  # a user's file: not named in replaces, left alone
    st = Staging(tmp_path, name=".partial", fingerprint="f")
    _assemble(st, {"summary.json": "new", "tokens.parquet": "new"})
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((os.path.basename(b), os.path.dirname(b))),
                                                     real(a, b)))
    published = st.publish(last="summary.json", replaces=("summary.json", "tokens.parquet", "figure.png"))
    order = [name for name, folder in moves if folder == str(tmp_path)]  # what entered the folder, in order
    assert order == ["tokens.parquet", "summary.json"]
    swaps = [m for m in moves if m[0] != Staging.JOURNAL]  # the journal itself is written atomically first
    assert moves[0][0] == Staging.JOURNAL and swaps[0] == ("summary.json", str(st.dir / Staging.ASIDE_DIR))
    assert [p.name for p in published] == order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "summary.json", "tokens.parquet"]
    assert (tmp_path / "summary.json").read_text() == "new"
    with pytest.raises(RuntimeError, match="nothing to publish as 'summary.json'"):
        Staging(tmp_path, name=".partial", fingerprint="f").publish(last="summary.json")


def test_an_error_mid_publish_leaves_the_old_output_whole_and_the_next_run_resumes(tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text("old")
    st = Staging(tmp_path, name=".partial", fingerprint="f")
    st.write_json("shard.json", [1, 2])
    _assemble(st, {"a.txt": "new", "summary.json": "new"})
    real = os.replace

    def dies_on_the_marker(a, b):
        if os.path.basename(b) == "summary.json":
            raise OSError("killed")
        return real(a, b)

    monkeypatch.setattr(os, "replace", dies_on_the_marker)
    with pytest.raises(OSError, match="killed"):
        st.publish(last="summary.json")
    monkeypatch.setattr(os, "replace", real)
    # the swap was undone: the old output, whole (no new file next to the old marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial", "summary.json"]
    assert (tmp_path / "summary.json").read_text() == "old"
    again = Staging(tmp_path, name=".partial", fingerprint="f")
    assert again.resumed and again.read_json("shard.json") == [1, 2] and list(again.output.iterdir()) == []


def test_a_folder_output_is_swapped_in_whole(tmp_path):
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    (old / "stale.bin").write_text("old")
    st = Staging(tmp_path, name=".checkpoint-staging", fingerprint=None)
    (st.output / "checkpoint-2").mkdir()
    (st.output / "checkpoint-2" / "model.bin").write_text("new")
    st.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert [p.name for p in old.iterdir()] == ["model.bin"]


def test_fingerprint_and_versions():
    settings = {"b": 1, "a": [1.5, None, "x"]}
    assert fingerprint(settings) == fingerprint({"a": [1.5, None, "x"], "b": 1})  # key order does not matter
    assert fingerprint(settings) != fingerprint({**settings, "b": 2}) and len(fingerprint(settings)) == 16
    import hashlib

    # the same digests as evaluation's generation hash and prompt hash (resumed sample logs stay valid)
    assert fingerprint(settings) == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint("p\ud800") == hashlib.sha256("p\ud800".encode("utf-8", "surrogatepass")).hexdigest()[:16]
    import torch

    import bupo

    v = versions()
    assert v == {"bupo": bupo.__version__, "torch": str(torch.__version__),
                 "transformers": __import__("transformers").__version__}
    assert versions(("bupo", "no-such-package-here")) == {"bupo": bupo.__version__}


def test_model_fingerprint_follows_the_weights():
    import torch

    from support.tiny_models import tiny_model

    m = tiny_model("qwen3", layers=2, vocab_size=64)
    a = model_fingerprint(m)
    assert a == model_fingerprint(m)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert model_fingerprint(m) != a
