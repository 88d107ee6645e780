"""A character-level tokenizer with a minimal, faithful copy of Qwen3's chat template (system/user/assistant turns +
``enable_thinking``) and a tiny Qwen3 model over its vocabulary: the generation, evaluation and context tests' pair."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Qwen3's chat template (Qwen/Qwen3-8B), reduced to what the paper's prompts use: a leading system
# turn, user/assistant turns, and the generation prompt with the empty think block when
# enable_thinking is false.
QWEN3_MINI_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(chat_template: str | None = QWEN3_MINI_TEMPLATE):
    """A character-level PreTrainedTokenizerFast: printable ASCII + newline, Qwen-style special tokens
    (pad <|endoftext|>=0, <|im_start|>=1, eos <|im_end|>=2), <think>/</think> as added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", *(chr(c) for c in range(32, 127))]
    vocab = {t: i for i, t in enumerate([*SPECIALS, "<unk>", "<think>", "</think>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(["<think>", "</think>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def tiny_qwen3(tokenizer, seed: int = 0, layers: int = 2, context: int = 256):
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper logits than the tiny default init, so samples differ visibly
        model.lm_head.weight.mul_(20.0)
    return model.eval()
