"""Fail loudly when TRL's private API that BuPOTrainer relies on changes (pinned trl==1.16.0).

BuPOTrainer overrides two private GRPOTrainer methods and toggles instance attributes that TRL reads at generation and
loss time. Each assumption is checked here by signature, by source, and functionally (internal log-probs through the
GRPOTrainer method equal the core's ``layer_logprobs``).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import trl
from trl import GRPOConfig, GRPOTrainer

from bupo.internal import layer_logits, layer_logprobs
from support.training import make_trainer

pytestmark = pytest.mark.xdist_group("training")


def _src(name: str) -> str:
    return inspect.getsource(getattr(GRPOTrainer, name))


def test_trl_version_is_pinned():
    # pyproject admits the 1.16 series: a patch release runs this file, which checks the private methods BuPO uses
    from packaging.version import Version

    assert Version(trl.__version__).release[:2] == (1, 16), (
        f"trl {trl.__version__}: BuPOTrainer overrides private GRPOTrainer methods verified on 1.16 only; "
        "re-verify tests/training/test_trl_contract.py and tests/training/test_training.py before widening the pin in pyproject.toml"
    )


def test_overridden_method_signatures():
    sig = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies)
    assert list(sig.parameters)[:8] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss",
    ]
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]
    assert list(inspect.signature(GRPOTrainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(GRPOTrainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    # staged checkpoint saves and the whole-run train_loss (bupo.training.trainer)
    assert list(inspect.signature(GRPOTrainer._get_output_dir).parameters) == ["self", "trial"]
    assert list(inspect.signature(GRPOTrainer._finalize_training).parameters) == [
        "self", "trial", "num_train_samples", "start_time"]
    # the non-finite stop (bupo.training.monitor): transformers' per-step gradient norm, called from its loop
    assert list(inspect.signature(GRPOTrainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    assert "self._get_grad_norm(model, grad_norm=grad_norm)" in inspect.getsource(GRPOTrainer._run_epoch)
    src = inspect.getsource(GRPOTrainer._finalize_training)
    assert "self._total_loss_scalar += self._tr_loss.item()" in src and "self._total_loss_scalar /" in src
    from transformers import Trainer

    assert "run_dir = self._get_output_dir(trial=trial)" in inspect.getsource(Trainer._save_checkpoint)
    # bupo train loads a finished run's last checkpoint itself (transformers would train past max_steps)
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint",
                                                                                  "model"]


def test_log_probs_go_through_the_overridden_method_with_the_fused_head():
    src = _src("_get_per_token_logps_and_entropies")
    assert "fused_lm_head=True" in src and "outputs.log_probs" in src and "outputs.entropy" in src
    gen = _src("_generate_and_score_completions")
    # old log-probs (and the reference's) are computed by the same method inside the rollout call
    assert gen.count("self._get_per_token_logps_and_entropies(") >= 2
    assert "old_per_token_logps" in gen
    assert "self.args.gradient_accumulation_steps % generate_every != 0" in gen
    loss = _src("_compute_loss")
    assert "self._get_per_token_logps_and_entropies(" in loss
    assert "per_token_logps.detach() if old_per_token_logps is None" in loss


def test_loss_pass_logs_the_entropy_bupo_copies():
    # BuPOTrainer._compute_loss copies the last train "entropy" into bupo/entropy_{phase}: TRL must log it once per
    # _compute_loss call, from the loss pass's own entropies, under the train key while the model is training
    loss = _src("_compute_loss")
    assert 'mode = "train" if self.model.training else "eval"' in loss
    assert loss.count('self._metrics[mode]["entropy"].append(global_masked_mean(entropies))') == 1
    assert "compute_entropy=True" in loss


def test_phase_flags_are_instance_attributes_read_at_generation_and_loss_time():
    gen, loss = _src("_generate_and_score_completions"), _src("_compute_loss")
    for src in (gen, loss):
        assert "self.use_vllm and self.vllm_importance_sampling_correction" in src
    assert "self.off_policy_mask_threshold is not None" in loss
    init = _src("__init__")
    assert "self.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction" in init
    assert "self.off_policy_mask_threshold = args.off_policy_mask_threshold" in init


def test_generation_happens_once_per_rollout_batch():
    src = _src("_prepare_inputs")
    assert "generate_every = self.args.steps_per_generation * self.num_iterations" in src
    assert "self._step % generate_every == 0 or self._buffered_inputs is None" in src
    assert "self._generate_and_score_completions(generation_batch)" in src


def test_instance_attributes_exist(tmp_path):
    tr = make_trainer(tmp_path, max_steps=1)
    for name in ("vllm_importance_sampling_correction", "off_policy_mask_threshold", "use_vllm", "ref_model",
                 "_metrics", "_step", "_buffered_inputs", "reward_funcs", "model_wrapped", "num_iterations",
                 "accelerator", "beta"):
        assert hasattr(tr, name), name
    assert isinstance(tr._metrics["train"], dict)
    assert isinstance(GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).steps_per_generation, int)


def test_internal_log_probs_through_grpo_method_equal_the_core(tmp_path):
    tr = make_trainer(tmp_path, max_steps=1, internal_layer=2, temperature=0.7)
    tok = tr.processing_class
    batch = tok(["hi", "a longer prompt", "mid size"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = 6
    tr.model.train()
    tr._bupo_internal = True
    logps, ent, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, mask, keep, compute_entropy=True)
    with torch.no_grad():
        ref = layer_logprobs(tr.model, ids, mask, layer=2, temperature=0.7)[:, -keep:]
        z = layer_logits(tr.model, ids, mask, layer=2)[:, :-1][:, -keep:].float() / 0.7
        lp = torch.log_softmax(z, -1)
        ref_ent = -(lp.exp() * lp).sum(-1)
    m = mask[:, -keep:].bool()  # TRL scores real (non-padding) target tokens only
    assert m.sum() > 0 and not m.all()
    assert torch.allclose(logps[m], ref[m], atol=1e-5), (logps[m] - ref[m]).abs().max()
    assert torch.allclose(ent[m], ref_ent[m], atol=1e-5)
    # and the full policy when not internal
    tr._bupo_internal = False
    full, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, mask, keep)
    with torch.no_grad():
        out = tr.model(input_ids=ids, attention_mask=mask, use_cache=False)
        ref_full = torch.log_softmax(out.logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(full[m], ref_full[:, -keep:][m], atol=1e-5)
    assert not torch.allclose(full[m], ref[m], atol=1e-2)  # the two policies differ: the check can fail
    assert tr.model.config.num_hidden_layers == 4  # the context restored the depth


def test_delta_is_verls_dual_clip():
    """The presets set delta=10 for verl's dual clip (clip_ratio_c=10). TRL clamps the ratio at delta before the
    clipped objective; for eps < delta - 1 that equals verl's min(max(L1, L2), -A c) for A < 0 and changes nothing for
    A > 0 - checked here on TRL's own expression and on a dense grid of ratios and advantages."""
    loss = _src("_compute_loss")
    assert "coef_1 = torch.clamp(coef_1, max=self.args.delta)" in loss
    assert "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)" in loss
    eps, c = 0.2, 10.0
    r = torch.logspace(-3, 3, 2001, dtype=torch.float64).unsqueeze(1)
    a = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64).unsqueeze(0)
    # TRL (grpo_trainer._compute_loss): coef_2 from the unclamped ratio, coef_1 clamped at delta
    coef_2 = torch.clamp(r, 1 - eps, 1 + eps)
    trl_loss = -torch.min(torch.clamp(r, max=c) * a, coef_2 * a)
    # verl core_algos.compute_policy_loss_vanilla with clip_ratio_c
    l1, l2 = -a * r, -a * torch.clamp(r, 1 - eps, 1 + eps)
    verl_loss = torch.where(a < 0, torch.min(torch.max(l1, l2), -a * c), torch.max(l1, l2))
    assert torch.allclose(trl_loss, verl_loss)


def test_vllm_sync_marker_guards_each_rollout_sync():
    """The in-training eval (``bupo.training.eval_callback.engine_backend``) syncs the colocated engine itself and
    records it in TRL's ``_last_loaded_step``, which TRL compares before each rollout's sync."""
    src = _src("_generate_single_turn")
    assert "if self.state.global_step != self._last_loaded_step:" in src
    assert "self.vllm_generation.sync_weights()" in src and "self._last_loaded_step = self.state.global_step" in src
    assert "self._last_loaded_step = -1" in _src("__init__")
    from trl.generation.vllm_generation import VLLMGeneration

    assert list(inspect.signature(VLLMGeneration.sync_weights).parameters) == ["self"]


def test_colocate_engines_are_one_per_process_unless_tensor_parallel(tmp_path):
    """The in-training eval shares its requests out between the ranks' engines (``RankShares``) only when each
    process has its own: TRL builds one colocated engine per tensor-parallel group of
    ``vllm_tensor_parallel_size`` ranks (default 1)."""
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert args.vllm_tensor_parallel_size == 1 and args.vllm_enable_sleep_mode is False
    src = inspect.getsource(GRPOTrainer.__init__)
    assert "tensor_parallel_size=args.vllm_tensor_parallel_size" in src
