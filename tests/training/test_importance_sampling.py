"""vLLM's importance-sampling correction is off for internal batches: their old log-probs are pi^k's, not the sampler's.

vLLM is not needed: the engine is faked where TRL calls it (``_generate_single_turn``), HF ``generate`` makes the
completions and every sampled token gets the sampler log-prob 0.0, so TRL's per-token ratio pi_old / pi_sampler is
exactly pi_old(o_t) wherever it is computed. Tiny random-init Qwen3 model (4 layers, k = 1), offline.
"""

from __future__ import annotations

import pytest
import torch

from bupo.training.trainer import BuPOTrainer
from support.training import make_trainer

pytestmark = pytest.mark.xdist_group("training")


class FakeVLLM(BuPOTrainer):
    """TRL's vLLM path without vLLM; records what each loss computation was given."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.use_vllm = True  # set after construction: TRL's constructor would import vLLM
        self.seen: list[dict] = []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self.use_vllm = False
        try:
            completion_ids, _ = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                              has_tool_images)
        finally:
            self.use_vllm = True
        return completion_ids, [[0.0] * len(ids) for ids in completion_ids]

    def _compute_loss(self, model, inputs):
        self.seen.append({"internal": self.bupo_internal, "is_flag": self.vllm_importance_sampling_correction,
                          **{k: inputs.get(k) for k in ("importance_sampling_ratio", "sampling_per_token_logps",
                                                        "old_per_token_logps", "completion_mask")}})
        return super()._compute_loss(model, inputs)


def test_internal_batches_get_no_importance_sampling_correction(tmp_path):
    tr = make_trainer(tmp_path, trainer_cls=FakeVLLM, internal_steps=2, max_steps=4, probe_every=0,
                      vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
                      vllm_importance_sampling_clip_max=3.0)
    tr.train()
    assert [s["internal"] for s in tr.seen] == [True, True, False, False]
    for s in tr.seen:
        cm = s["completion_mask"].bool()
        assert torch.equal(s["sampling_per_token_logps"][cm], torch.zeros(int(cm.sum())))  # the fake engine's
        if s["internal"]:
            # neither computed at generation nor applied in the loss (TRL would index the missing ratio if it were)
            assert s["is_flag"] is False and s["importance_sampling_ratio"] is None
            assert s["old_per_token_logps"] is None  # so the ratio pi^k / pi^k_old starts at 1, as in Eq. 9
        else:
            assert s["is_flag"] is True
            ratio, old = s["importance_sampling_ratio"], s["old_per_token_logps"]
            assert torch.allclose(ratio[cm], old.exp()[cm], atol=1e-6) and (ratio[cm] < 1).all()
    logs = [h for h in tr.state.log_history if "bupo/phase" in h]
    assert [("sampling/importance_sampling_ratio/mean" in h) for h in logs] == [False, False, True, True]
    assert tr.args.vllm_importance_sampling_correction is True  # the config is untouched
