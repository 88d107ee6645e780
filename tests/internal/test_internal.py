"""The internal-policy core against independent references, on tiny random-init models of every family."""

from __future__ import annotations

import copy

import pytest
import torch

from bupo.internal import (
    STREAMS,
    InternalPolicyError,
    capture_streams,
    internal_policy,
    layer_logits,
    layer_logprobs,
    parts,
    stream_stats,
    token_stats,
)
from support.tiny_models import FAMILIES, random_batch, tiny_model


def _ref_head(p, h):
    z = p.lm_head(h)
    return torch.tanh(z / p.softcap) * p.softcap if p.softcap else z


def _dense_entropy(z: torch.Tensor) -> torch.Tensor:
    logp = z.double().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param, tie=request.param in ("qwen3", "gemma2"))


def test_final_norm_projection_of_last_layer_equals_model_logits(family_model):
    m = family_model
    ids, mask = random_batch(m, pad_left=3)
    ref = m(ids, attention_mask=mask).logits
    got = layer_logits(m, ids, mask, layer=parts(m).num_layers - 1, projection="final_norm")
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)


def test_raw_layer_logits_equal_lm_head_of_hidden_states(family_model):
    m = family_model
    p = parts(m)
    ids, mask = random_batch(m)
    hs = m(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for k in range(p.num_layers - 1):  # hidden_states[L] is post-norm, so k = L-1 has no raw reference there
        got = layer_logits(m, ids, mask, layer=k)
        assert torch.allclose(got, _ref_head(p, hs[k + 1]), atol=1e-5, rtol=0), k
    # the last layer's raw policy is lm_head of the final norm's *input*
    with capture_streams(m, streams=["resid_post"], layers=[p.num_layers - 1]) as st:
        m(ids, attention_mask=mask)
    got = layer_logits(m, ids, mask, layer=p.num_layers - 1)
    assert torch.allclose(got, _ref_head(p, st[("resid_post", p.num_layers - 1)]), atol=1e-5, rtol=0)


def test_layer_logprobs_are_log_softmax_of_layer_logits_at_temperature(family_model):
    m = family_model
    ids, mask = random_batch(m)
    z = layer_logits(m, ids, mask, layer=1).double()
    ref = (z[:, :-1] / 0.7).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = layer_logprobs(m, ids, mask, layer=1, temperature=0.7)
    assert got.shape == ids[:, 1:].shape
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_residual_decomposition_and_normalised_inputs(family_model):
    m = family_model
    p = parts(m)
    ids, mask = random_batch(m)
    with capture_streams(m) as st:
        m(ids, attention_mask=mask)
    assert len(st) == len(STREAMS) * p.num_layers
    a = p.adapter
    for la in range(p.num_layers):
        pre, mid, post = st[("resid_pre", la)], st[("resid_mid", la)], st[("resid_post", la)]
        assert torch.allclose(mid, pre + st[("attn_out", la)], atol=1e-5)
        assert torch.allclose(post, pre + st[("attn_out", la)] + st[("mlp_out", la)], atol=1e-5)
        attn_in = p.layer_module(la, "input_norm")(pre) if a.input_norm else pre
        mlp_in = p.layer_module(la, "pre_mlp_norm")(mid) if a.pre_mlp_norm else mid
        assert torch.allclose(st[("attn_in", la)], attn_in, atol=1e-6)
        assert torch.allclose(st[("mlp_in", la)], mlp_in, atol=1e-6)
        if la:
            assert torch.equal(pre, st[("resid_post", la - 1)])
    assert torch.allclose(st[("resid_pre", 0)], p.embed(ids), atol=1e-5)  # H^0 (Gemma scales inside embed)


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma2"])
@pytest.mark.parametrize("tie", [False, True])
def test_gradient_isolation(family, tie):
    m = tiny_model(family, tie=tie, layers=5).train()
    p = parts(m)
    k = 2
    ids, mask = random_batch(m)
    layer_logprobs(m, ids, mask, layer=k).sum().backward()
    assert p.embed.weight.grad is not None and p.lm_head.weight.grad is not None
    for la in range(p.num_layers):
        grads = [q.grad for q in p.layers[la].parameters()]
        if la <= k:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), la
        else:
            assert all(g is None for g in grads), la
    assert all(q.grad is None for q in p.final_norm.parameters())


def test_truncated_forward_runs_no_layer_above_k():
    m = tiny_model("qwen3", layers=6)
    p = parts(m)
    calls = [0] * p.num_layers
    hooks = [layer.register_forward_pre_hook(lambda mod, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(p.layers)]
    norm_calls = []
    hooks.append(p.final_norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    ids, mask = random_batch(m)
    layer_logits(m, ids, mask, layer=2)
    for h in hooks:
        h.remove()
    assert calls == [1, 1, 1, 0, 0, 0]


def test_context_restores_model_and_generate_samples_the_internal_policy():
    m = tiny_model("qwen3", layers=4)
    ids, mask = random_batch(m, batch=1, seq=5)
    full_before = m(ids).logits
    k = 1
    with internal_policy(m, k) as hf:
        assert hf.config.num_hidden_layers == k + 1
        greedy = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert m.config.num_hidden_layers == 4
    assert torch.equal(m(ids).logits, full_before)
    # the generated tokens are the argmax of the layer-k policy, step by step
    seq = ids
    for _ in range(6):
        nxt = layer_logits(m, seq, layer=k)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(greedy, seq)
    full = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(full, greedy)  # with random weights the full and layer-1 policies disagree


def test_context_restores_on_exception_and_guard_fires():
    m = tiny_model("qwen3", layers=4)
    p = parts(m)
    with pytest.raises(RuntimeError, match="boom"), internal_policy(m, 1):
        raise RuntimeError("boom")
    assert m.config.num_hidden_layers == 4
    assert not p.final_norm._forward_hooks and not any(la._forward_pre_hooks for la in p.layers)
    # a layer above k must never run while the context is active (families that ignore the truncation)
    h = torch.randn(1, 3, m.config.hidden_size)
    pos = m.model.rotary_emb(h, torch.arange(3)[None])
    with internal_policy(m, 1), pytest.raises(InternalPolicyError, match="layer 2"):
        p.layers[2](h, attention_mask=None, position_embeddings=pos)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
@pytest.mark.parametrize("projection", ["raw", "final_norm"])
def test_chunked_entropy_matches_dense_fp64(chunk, projection):
    m = tiny_model("gemma2", tie=True)  # softcap + tied embeddings
    p = parts(m)
    h = torch.randn(50, m.config.hidden_size) * 3
    targets = torch.randint(0, m.config.vocab_size, (50,))
    s = token_stats(m, h, projection=projection, targets=targets, chunk_size=chunk)
    hh = p.final_norm(h) if projection == "final_norm" else h
    z = _ref_head(p, hh).double()
    logp = z.log_softmax(-1)
    assert (s.entropy.double() - _dense_entropy(z)).abs().max() < 1e-4
    assert (s.logprob.double() - logp.gather(-1, targets[:, None]).squeeze(-1)).abs().max() < 1e-4
    assert torch.equal(s.top1_id, z.argmax(-1))
    assert torch.allclose(s.top1_prob.double(), logp.max(-1).values.exp(), atol=1e-5)


def test_stream_stats_match_dense_reference_on_selected_positions():
    m = tiny_model("qwen3", layers=4)
    p = parts(m)
    ids, mask = random_batch(m, batch=2, seq=10, pad_left=2)
    positions = mask.bool().clone()
    positions[:, :4] = False  # e.g. only response tokens
    targets = torch.roll(ids, -1, dims=1)
    st = stream_stats(m, ids, mask, positions=positions, targets=targets, chunk_size=5)
    with capture_streams(m) as raw:
        logits = m(ids, attention_mask=mask).logits
    assert st.num_positions == int(positions.sum())
    for (stream, la), ts in st.stats.items():
        z = _ref_head(p, raw[(stream, la)][positions]).double()
        assert (ts.entropy.double() - _dense_entropy(z)).abs().max() < 1e-4, (stream, la)
        lp = z.log_softmax(-1).gather(-1, targets[positions][:, None]).squeeze(-1)
        assert (ts.logprob.double() - lp).abs().max() < 1e-4
    assert (st.final.entropy.double() - _dense_entropy(logits[positions])).abs().max() < 1e-4
    assert st.entropy("resid_post").shape == (p.num_layers, int(positions.sum()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layer=4), "out of range"),
        (dict(layer=-1), "out of range"),
        (dict(layer="2"), "must be an int"),
        (dict(layer=1, projection="tuned"), "unknown projection"),
    ],
)
def test_bad_input_is_a_clear_value_error_and_leaves_model_unchanged(kwargs, match):
    m = tiny_model("llama", layers=4)
    before = copy.deepcopy(m.state_dict())
    ids, mask = random_batch(m)
    with pytest.raises(ValueError, match=match):
        layer_logits(m, ids, mask, **kwargs)
    assert m.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not parts(m).final_norm._forward_hooks


def test_bad_masks_streams_and_architecture():
    m = tiny_model("llama", layers=4)
    ids, mask = random_batch(m)
    with pytest.raises(ValueError, match="does not match"):
        layer_logits(m, ids, mask[:, :-1], layer=1)
    with pytest.raises(ValueError, match="unknown stream"):
        stream_stats(m, ids, streams=["attn_pattern"])
    with pytest.raises(ValueError, match="boolean mask"):
        stream_stats(m, ids, positions=mask)
    m.config.model_type = "gpt_oss"
    with pytest.raises(ValueError, match="unsupported architecture.*qwen3.*register_adapter"):
        layer_logits(m, ids, layer=0)


def test_stream_stats_final_norm_projection_with_the_real_policy():
    # projecting with final_norm from inside a stream hook must not disturb the hook that reads the real policy
    m = tiny_model("llama", layers=3)
    p = parts(m)
    ids, mask = random_batch(m)
    st = stream_stats(m, ids, mask, streams=["attn_out", "resid_post"], projection="final_norm")
    with capture_streams(m, streams=["attn_out"], layers=[1]) as raw:
        logits = m(ids, attention_mask=mask).logits
    z = _ref_head(p, p.final_norm(raw[("attn_out", 1)])).reshape(-1, m.config.vocab_size)
    assert (st.stats[("attn_out", 1)].entropy.double() - _dense_entropy(z)).abs().max() < 1e-4
    assert (st.final.entropy.double() - _dense_entropy(logits.reshape(-1, m.config.vocab_size))).abs().max() < 1e-4
    # the last layer's final_norm projection is the model's own policy
    assert torch.allclose(st.stats[("resid_post", 2)].entropy, st.final.entropy, atol=1e-5)


def test_entropy_is_accurate_for_large_raw_logits():
    # raw residual streams have large norms: logits with std ~50 must not lose precision to cancellation
    m = tiny_model("qwen3", layers=2)
    p = parts(m)
    h = torch.randn(64, m.config.hidden_size) * 400
    s = token_stats(m, h, chunk_size=16)
    assert (s.entropy.double() - _dense_entropy(_ref_head(p, h))).abs().max() < 2e-5


def test_parts_unwraps_wrappers_that_forward_attributes_like_deepspeed_engine():
    """DeepSpeedEngine keeps the model under ``.module`` and forwards unknown attributes (``config``, ``model``) to it;
    ``parts`` must still resolve the HF model itself, not the wrapper, as for DDP's plain ``.module``."""

    class ForwardingWrapper(torch.nn.Module):  # DeepSpeedEngine's attribute behaviour, without DeepSpeed
        def __init__(self, module):
            super().__init__()
            self.module = module

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("module"), name)

    class PlainWrapper(torch.nn.Module):  # DDP's: no forwarding
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llama")
    for wrapped in (ForwardingWrapper(model), PlainWrapper(model), PlainWrapper(ForwardingWrapper(model))):
        p = parts(wrapped)
        assert p.model is model and p.lm_head is model.lm_head and p.num_layers == model.config.num_hidden_layers
