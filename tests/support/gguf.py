"""A tiny GGUF file built with the ``gguf`` writer: the import/conversion tests' stand-in for a real one."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with a byte-level BPE (gpt2) tokenizer whose merges spell "Hello world" in 2 tokens;
    bos = <|im_start|> (1), eos = pad = <|im_end|> (2), as SmolLM2's."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(set(bytes_to_unicode().values())),
              *(m.replace(" ", "") for m in merges)]
    v, h, f = len(tokens), 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(h // 4)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (v - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(v, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(2):
        for name, shape in [("attn_q", (h, h)), ("attn_k", (h // 2, h)), ("attn_v", (h // 2, h)),
                            ("attn_output", (h, h)), ("ffn_gate", (f, h)), ("ffn_up", (f, h)), ("ffn_down", (h, f))]:
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(h))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(h))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
