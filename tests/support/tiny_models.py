"""Tiny random-init models of every supported family, built offline (no hub) for the core tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"]

_COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_EXTRA = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
    "gemma2": dict(final_logit_softcapping=5.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8, sliding_window=8),
    "gemma3_text": dict(final_logit_softcapping=5.0, query_pre_attn_scalar=8, sliding_window=8),
    "phi3": dict(resid_pdrop=0.0),
    "qwen2": dict(),
}


def tiny_model(model_type: str = "qwen3", *, tie: bool = False, layers: int = 4, seed: int = 0,
               dtype=torch.float32, **overrides) -> torch.nn.Module:
    kw = {**_COMMON, **_EXTRA.get(model_type, {}), "num_hidden_layers": layers, "tie_word_embeddings": tie}
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError:  # newer transformers run Gemma-2's soft-capped attention in eager only
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # random init is tiny-scaled; widen the norms' weights so internal policies are not all uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def random_batch(model, batch: int = 2, seq: int = 12, seed: int = 1, pad_left: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_left:
        ids[0, :pad_left] = model.config.pad_token_id
        mask[0, :pad_left] = 0
    return ids, mask
