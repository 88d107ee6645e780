"""A run that cannot learn says so: equal rewards within every group (all advantages 0) for CANNOT_LEARN_AFTER rollout
steps in a row, or a gradient norm of 0 that many logs in a row -> one warning line with the numbers and the likely
causes, once per run."""

from __future__ import annotations

import logging

import pytest

from bupo.training.monitor import CANNOT_LEARN_AFTER
from support.training import make_dataset, make_trainer

pytestmark = pytest.mark.xdist_group("training")


def never_fires(completions, **kwargs):
    """A reward that always returns 0 (as boxed_exact does for a model that never writes \\boxed{})."""
    return [0.0] * len(completions)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "bupo.training.monitor" and "cannot learn" in r.getMessage()]


def test_a_reward_that_never_fires_on_the_bundled_model_is_reported(tmp_path, caplog) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bupo.training.trainer import BuPOTrainer
    from bupo.zoo import DEFAULT_MODEL
    from support.training import make_config

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).train()
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL, padding_side="left")
    args = make_config(tmp_path, max_steps=CANNOT_LEARN_AFTER + 1, per_device_train_batch_size=4, num_generations=4,
                       max_completion_length=4, internal_steps=1, probe_every=0, log_policy_entropies=False)
    trainer = BuPOTrainer(model=model, reward_funcs=never_fires, args=args, train_dataset=make_dataset(8),
                          processing_class=tok)
    with caplog.at_level(logging.WARNING, logger="bupo.training.monitor"):
        trainer.train()
    lines = _warnings(caplog)
    assert len(lines) == 1, lines  # once, not once per step
    line = lines[0]
    assert "\n" not in line
    assert f"equal within every group for {CANNOT_LEARN_AFTER} rollout steps in a row" in line
    assert "mean reward 0.000" in line and "the reward never fires" in line
    # 4-token completions of a model that answers in sentences: all clipped, so truncation is named with the limit
    assert "100% of completions clipped at max_completion_length 4" in line
    assert "raise --max_completion_length, now 4" in line
    history = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert all(h["frac_reward_zero_std"] == 1.0 and h["grad_norm"] == 0.0 for h in history)


def test_zero_gradient_norms_in_a_row_are_reported_and_a_learning_run_is_not(tmp_path, caplog) -> None:
    trainer = make_trainer(tmp_path, max_steps=CANNOT_LEARN_AFTER, probe_every=0)
    with caplog.at_level(logging.WARNING, logger="bupo.training.monitor"):
        trainer.train()  # letter_reward: continuous, groups differ, gradients flow
        assert _warnings(caplog) == []
        for _ in range(CANNOT_LEARN_AFTER - 1):
            trainer.log({"grad_norm": 0.0})
        trainer.log({"grad_norm": 0.5})  # a non-zero norm restarts the count
        assert _warnings(caplog) == []
        for _ in range(CANNOT_LEARN_AFTER):
            trainer.log({"grad_norm": 0.0})
    lines = _warnings(caplog)
    assert len(lines) == 1 and f"gradient norm was 0.0 at {CANNOT_LEARN_AFTER} logged steps in a row" in lines[0]
