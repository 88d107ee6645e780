"""``bupo analyze --preset official``: the official analysis script's settings (10 samples, 3072 tokens, the model's own
chat template - thinking for Qwen3 -, fp32), flags given explicitly winning, recorded in summary.json."""

from __future__ import annotations

import json

import pytest

from bupo.analysis.cli import _FLAG_DEFAULTS, PRESET_CHOICES, _apply_preset
from bupo.analysis.config import PRESET_DIFFERENCES, PRESETS, AnalysisConfig
from bupo.cli import build_parser
from bupo.cli import main as cli_main


def _resolved(*argv: str):
    args = build_parser().parse_args(["analyze", *argv])
    _apply_preset(args)
    return args


def test_choices_match_the_presets() -> None:
    assert tuple(PRESETS) == PRESET_CHOICES and set(PRESET_DIFFERENCES) == set(PRESETS)


def test_official_settings_and_explicit_flags_win() -> None:
    a = _resolved("--preset", "official")
    assert (a.limit, a.max_new_tokens, a.template, a.dtype) == (10, 3072, "chat", "float32")
    assert (a.temperature, a.top_p) == (1.0, 1.0)
    b = _resolved("--preset", "official", "--max-new-tokens", "1024", "--dtype", "bfloat16", "--limit", "3")
    assert (b.limit, b.max_new_tokens, b.template, b.dtype) == (3, 1024, "chat", "bfloat16")
    c = _resolved()  # no preset: bupo's documented defaults
    assert (c.limit, c.max_new_tokens, c.template, c.dtype) == (None, 1024, "auto", "auto")
    assert _FLAG_DEFAULTS == {"max_new_tokens": 1024, "template": "auto", "dtype": "auto"}
    d = _resolved("--preset", "official", "--dtype", "auto", "--max-new-tokens", "1024")  # given at the default
    assert (d.max_new_tokens, d.template, d.dtype) == (1024, "chat", "auto")


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'; accepted: official"):
        AnalysisConfig(preset="nope", figures=False).validate(out_dir=None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--preset", "nope"])


def test_preset_is_recorded_in_summary_json(tmp_path, capsys) -> None:
    out = tmp_path / "official"
    assert cli_main(["analyze", "--preset", "official", "--max-new-tokens", "8", "--limit", "2", "--out", str(out),
                     "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["preset"]["name"] == "official" and s["preset"]["settings"] == PRESETS["official"]
    assert "hidden_states[P+1:]" in s["preset"]["not_reproduced"]
    assert s["dtype"] == "float32" and s["template"] == "chat" and s["num_samples"] == 2
    assert s["generation"]["max_new_tokens"] == 8  # the explicit flag won
