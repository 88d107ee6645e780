"""BuPO's loss clamps the log-ratio log pi - log pi_old to [-20, 20] as the official code does; TRL does not, and past
~88 exp overflows float32: the ratio is inf and the gradient NaN. Tested at |log pi - log pi_old| ~ 100."""

from __future__ import annotations

import math

import pytest
import torch

from bupo.training.trainer import LOG_RATIO_CLAMP, BuPOTrainer, clamp_to_old
from support.training import make_trainer

pytestmark = pytest.mark.xdist_group("training")


def test_clamp_to_old_bounds_value_and_gradient() -> None:
    logps = torch.tensor([-3.0, -3.0, -3.0], requires_grad=True)
    old = torch.tensor([-103.0, 97.0, -4.0])  # log-ratios +100, -100, +1
    clamped = clamp_to_old(logps, old)
    assert torch.equal(clamped - old, torch.tensor([20.0, -20.0, 1.0]))
    torch.exp(clamped - old).sum().backward()
    assert torch.equal(logps.grad, torch.tensor([0.0, 0.0, math.e]))  # no gradient outside the bound
    inside = torch.tensor([-2.7, -0.1])
    assert torch.equal(clamp_to_old(inside, torch.tensor([-2.9, -13.3])), inside)  # bit for bit within the bound
    assert LOG_RATIO_CLAMP == 20.0


def _loss_grads(tmp_path, trainer_cls, shift: float) -> tuple[float, list[torch.Tensor]]:
    """One real rollout batch with pi_old set ``shift`` nats below pi (log-ratio ~ +shift), then TRL's loss + backward."""
    trainer = make_trainer(tmp_path, trainer_cls=trainer_cls, internal_steps=1, probe_every=0,
                           log_policy_entropies=False)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which this test does not run
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))
    inputs["old_per_token_logps"] = logps - shift
    inputs["advantages"] = torch.where(torch.arange(len(inputs["advantages"])) % 2 == 0, 1.0, -1.0)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), [p.grad for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("shift", [100.0, -100.0])
def test_bupo_loss_at_a_log_ratio_of_100_has_finite_gradients(tmp_path, shift: float) -> None:
    loss, grads = _loss_grads(tmp_path, BuPOTrainer, shift)
    assert math.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_trl_without_the_clamp_gives_a_non_finite_loss_or_gradient(tmp_path) -> None:
    """The reason for the clamp: the same batch through TRL's own GRPOTrainer (no clamp)."""
    from trl import GRPOTrainer

    class Plain(BuPOTrainer):  # everything of BuPOTrainer but the clamp: TRL's _compute_loss directly
        def _compute_loss(self, model, inputs):
            return GRPOTrainer._compute_loss(self, model, inputs)

    loss, grads = _loss_grads(tmp_path, Plain, 100.0)
    assert not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads)
