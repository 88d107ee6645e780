"""k = L-1 under projection raw is the last layer's residual WITHOUT the final norm: not the model's own policy.
Training warns about it before the first rollout; analysis summaries do not call it the model's own policy."""

from __future__ import annotations

import logging

import numpy as np

from bupo.training.layer import check_internal_policy, last_layer_raw_warning
from support.analysis import answer, healthy_stats
from support.training import char_tokenizer, make_model


def test_the_warning_fires_only_for_the_last_layer_under_raw() -> None:
    line = last_layer_raw_warning(3, 4, "raw")
    assert line and "k = 3 = L-1 with projection raw" in line and "NOT the model's own policy" in line
    assert "--internal_projection final_norm" in line and "\n" not in line
    assert last_layer_raw_warning(2, 4, "raw") is None
    assert last_layer_raw_warning(3, 4, "final_norm") is None


def test_training_preflight_logs_it_and_records_it(caplog) -> None:
    rows = [{"prompt": [{"role": "user", "content": "what is 2+2?"}]}]
    with caplog.at_level(logging.WARNING, logger="bupo.training.layer"):
        check = check_internal_policy(make_model(layers=4), char_tokenizer(), rows, "chat", 3, "raw")
    assert any("k = 3 = L-1 with projection raw" in r.getMessage() for r in caplog.records)
    assert check is not None and "L-1 with projection raw" in check["last_layer_raw"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bupo.training.layer"):
        check = check_internal_policy(make_model(layers=4), char_tokenizer(), rows, "chat", 2, "raw")
    assert not any("L-1" in r.getMessage() for r in caplog.records) and check["last_layer_raw"] is None


def test_no_convergence_stage_under_raw_is_not_called_the_models_own_policy() -> None:
    rng = np.random.default_rng(1)
    raw = answer(rng.uniform(0.1, 1.0, 30), healthy_stats(30, rng), projection="raw")
    reason = raw["boundary"]["reason"]
    assert "no convergence stage" in reason and "not the model's own policy" in reason
    assert "internal phase would be GRPO" not in reason
