"""The bundled model's tokenizer: character-level with a few whole-word tokens, plus a Qwen3 chat template.

Built with the ``tokenizers`` library (a ``WordLevel`` model over single characters and a short list of
whole words from the system prompt and chat template, split by one regex), wrapped as a fast tokenizer
and saved with ``save_pretrained``. Digits, operators and spaces are single tokens, so the arithmetic is
done one character at a time; the constant system prompt costs ~20 tokens instead of ~70.

Special tokens follow Qwen3: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos, ends an
assistant turn); ``<think>`` / ``</think>`` are added non-special tokens. Characters outside printable
ASCII and newline map to ``<unk>``.
"""

from __future__ import annotations

import re
from typing import Any

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
# whole words (each also with a leading space): the system prompt, the chat roles, the task's verb
WORDS = (
    "Please", "reason", "step", "by", "and", "put", "your", "final", "answer", "within", "\\boxed",
    "system", "user", "assistant", "Compute",
)  # fmt: skip
CHARS = ("\n", *(chr(c) for c in range(32, 127)))

# The official Qwen3 template (Qwen/Qwen3-8B tokenizer_config.json) without its tool-calling branches:
# system/user/assistant turns, the reasoning_content split of assistant turns after the last user turn,
# and `enable_thinking=False` opening the assistant turn with an empty think block.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


def vocabulary() -> dict[str, int]:
    """Token -> id. Ids are fixed by construction order: specials, think tags, unk, chars, words."""
    pieces = [w for word in WORDS for w in (word, " " + word)]
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *THINK_TOKENS, UNK_TOKEN, *CHARS, *pieces):
        vocab.setdefault(tok, len(vocab))
    return vocab


def build_tokenizer() -> Any:
    """A fresh fast tokenizer (``transformers`` fast tokenizer) with the chat template and Qwen3 specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    words = sorted({w for word in WORDS for w in (word, " " + word)}, key=lambda s: (-len(s), s))
    # longest word first, else any single character (so every input splits losslessly)
    pattern = "|".join(re.escape(w) for w in words) + r"|[\s\S]"
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate pieces: no spaces are inserted between tokens
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",  # generation-friendly default; training code pads explicitly
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
