"""Analysis helpers: a char-level tokenizer with a ChatML template, tiny models over its vocabulary, three traces,
a constructed healthy per-layer profile and the boundary rule's answer for a profile."""

from __future__ import annotations

import numpy as np

from bupo.analysis.summary import boundary_details, boundary_record, projection_health
from support.tiny_models import tiny_model


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def make_model(model_type="qwen3", layers=3, tie=True, **kw):
    return tiny_model(model_type, layers=layers, tie=tie, vocab_size=128, **kw)


TRACES = [
    {"prompt": [{"role": "system", "content": "Reason."}, {"role": "user", "content": "Compute 2+3."}],
     "response": "2+3=5, so \\boxed{5}"},
    {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "response": "Hello there!"},
    {"prompt": "Q: 7*6?\nA:", "response": " 42"},
]


def healthy_stats(L: int, rng) -> dict:
    """A readable projection: entropy high in the bottom layers (top-1 rarely the final one), converging on top."""
    H = np.linspace(8.0, 2.0, L) + rng.uniform(-0.2, 0.2, L)
    agree = np.linspace(0.0, 0.9, L)
    return {"layer_entropy": H.tolist(), "layer_top1_agreement": agree.tolist(),
            "layer_logprob": (-H - 0.5).tolist(), "final_entropy": 1.9, "resid_rms": np.linspace(1, 8, L).tolist()}


def answer(ffn, stats, projection="raw", delta="bupo"):
    health = projection_health(stats, projection=projection)
    return boundary_record(boundary_details(ffn), health, delta=delta, projection=projection, ffn_delta_means=ffn)
