"""load_model refuses, in one line, a checkpoint that is not what its config says: missing / unexpected / reshaped
tensors (a config whose layer count or model_type disagrees with the weights), non-float or non-finite weights, an
unreadable config.json, another model's tokenizer, a chat template that does not compile or never finishes; and a
GGUF whose merge list is broken. Healthy tiny models of several families (tied and untied heads, rotary buffers)
load without a word."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bupo.models import bundled_model_path, load_model, load_tokenizer
from support.tiny_models import tiny_model

UP = "model.layers.3.mlp.up_proj.weight"


def _copy_bundled(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(bundled_model_path(), out)
    return out


def _edit_weights(folder: Path, edit) -> None:
    sd = dict(load_file(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _one_line_error(folder: Path, *parts: str, tokenizer: bool = False) -> str:
    with pytest.raises(ValueError) as info:
        load_model(folder, device="cpu", tokenizer=tokenizer)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg
    for part in parts:
        assert part in msg, msg
    return msg


@pytest.mark.parametrize("family, tie", [("qwen3", False), ("qwen3", True), ("llama", False), ("gemma3_text", True)])
def test_healthy_tiny_models_load_silently(tmp_path, capfd, family, tie):
    """Tied lm_head / embeddings and the non-persistent rotary inv_freq buffers are not flagged."""
    model = tiny_model(family, tie=tie)
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m", device="cpu", tokenizer=False)
    assert tok is None
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_dropped_tensor_is_named_with_the_count(tmp_path, capfd):
    m = _copy_bundled(tmp_path)
    _edit_weights(m, lambda sd: sd.pop(UP))
    _one_line_error(m, "1 tensor(s) of the model missing from the checkpoint", repr(UP))
    assert "LOAD REPORT" not in capfd.readouterr().err  # the one line says it, not transformers' table


def test_renamed_tensor_is_missing_and_unexpected(tmp_path):
    m = _copy_bundled(tmp_path)
    _edit_weights(m, lambda sd: sd.update({"model.layers.3.mlp.upp.weight": sd.pop(UP)}))
    _one_line_error(m, "missing from the checkpoint", "has no place for ('model.layers.3.mlp.upp.weight')")


def test_reshaped_tensor_is_a_mismatch(tmp_path):
    m = _copy_bundled(tmp_path)
    _edit_weights(m, lambda sd: sd.update({UP: sd[UP][:-8].clone()}))
    _one_line_error(m, "1 tensor(s) of another shape", "[376, 128] in the checkpoint, [384, 128] in the model")


@pytest.mark.parametrize("layers, part", [(6, "22 checkpoint tensor(s) the model has no place for"),
                                          (10, "22 tensor(s) of the model missing from the checkpoint")])
def test_layer_count_that_disagrees_with_the_weights(tmp_path, layers, part):
    m = _copy_bundled(tmp_path)  # 8 layers of 11 tensors each
    _edit_config(m, num_hidden_layers=layers, layer_types=["full_attention"] * layers)
    _one_line_error(m, part, "and 19 more")


def test_model_type_that_disagrees_with_the_weights(tmp_path):
    m = _copy_bundled(tmp_path)  # qwen3 has q_norm / k_norm, llama has not
    _edit_config(m, model_type="llama", architectures=["LlamaForCausalLM"])
    _one_line_error(m, "16 checkpoint tensor(s) the model has no place for", "self_attn.k_norm.weight")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(tmp_path, value):
    m = _copy_bundled(tmp_path)

    def poison(sd):
        t = sd[UP].clone()
        t[0, :3] = value
        sd[UP] = t

    _edit_weights(m, poison)
    _one_line_error(m, "1 weight tensor(s) hold NaN or inf", f"{UP!r} has 3 non-finite value(s)")


def test_large_finite_half_weights_are_not_flagged(tmp_path):
    """A float16 sum overflows on large finite weights: that alone is not a NaN/inf weight."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(60000.0)
    model.half().save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", device="cpu", tokenizer=False)
    assert loaded.dtype == torch.float16


def test_integer_weights_without_a_quantization_config(tmp_path):
    m = _copy_bundled(tmp_path)
    _edit_weights(m, lambda sd: sd.update({k: (v * 1000).to(torch.int32) for k, v in sd.items()}))
    _one_line_error(m, "90 weight tensor(s) are not floating point (I32:", "declares no quantization_config")


@pytest.mark.parametrize("text, part", [
    ("{not json", "config.json is not valid JSON (JSONDecodeError"),
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    ('{"model_type": "qwen3", "hidden_size": "big"}', "transformers cannot load its config.json"),
    ('{"model_type": "nonesuch"}', "model type `nonesuch`"),
])
def test_garbage_config_json(tmp_path, text, part):
    m = _copy_bundled(tmp_path)
    (m / "config.json").write_text(text)
    msg = _one_line_error(m, part)
    assert "accepted:" in msg


def test_tokenizer_of_a_larger_vocabulary(tmp_path):
    m = _copy_bundled(tmp_path)
    tok = load_tokenizer(m)
    tok.add_tokens([f"<extra_{i}>" for i in range(20)])
    tok.save_pretrained(m)
    _one_line_error(m, f"the tokenizer has {len(tok)} tokens but the model's embedding has 132 rows",
                    tokenizer=True)
    with pytest.raises(ValueError, match="belongs to another model"):
        load_tokenizer(m)  # the same check without the weights (bupo train's tokenizer): config.json's vocab_size


def test_chat_template_with_a_jinja_syntax_error(tmp_path):
    m = _copy_bundled(tmp_path)
    (m / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    _one_line_error(m, "the chat template is not valid Jinja (line 1:", tokenizer=True)


def test_chat_template_that_fails_when_rendered(tmp_path):
    m = _copy_bundled(tmp_path)
    (m / "chat_template.jinja").write_text("{{ messages[0].content + 1 }}")
    _one_line_error(m, "the chat template failed while rendering a prompt", tokenizer=True)


LOOP_FOR_EVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_chat_template_that_never_finishes_is_stopped(tmp_path, monkeypatch):
    import bupo.data.chat_render as chat_render

    monkeypatch.setattr(chat_render, "RENDER_SECONDS", 0.5)
    m = _copy_bundled(tmp_path)
    (m / "chat_template.jinja").write_text(LOOP_FOR_EVER)
    _one_line_error(m, "did not finish rendering a prompt within 0.5 s", tokenizer=True)


def test_rendering_is_bounded_off_the_main_thread_too(tmp_path, monkeypatch):
    import bupo.data.chat_render as chat_render
    from bupo.data.templates import render_prompt

    monkeypatch.setattr(chat_render, "RENDER_SECONDS", 0.5)
    tok = load_tokenizer(bundled_model_path())
    tok.chat_template = LOOP_FOR_EVER
    seen = []

    def work():
        try:
            render_prompt(tok, [{"role": "user", "content": "1+1"}], "chat")
        except ValueError as exc:
            seen.append(str(exc))

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert not t.is_alive() and seen and "did not finish rendering" in seen[0]
    # and the render itself was stopped: a runaway render left behind held the GIL for the rest of the process
    # (the rare 150-200 s stalls of later tests in the same xdist worker)
    assert not [x for x in threading.enumerate() if x.name == "bupo-chat-template"]


def test_a_timer_of_the_caller_survives_a_render(monkeypatch):
    """The main-thread bound borrows SIGALRM; a timer that was running before is given back."""
    import signal

    from bupo.data.templates import render_prompt

    tok = load_tokenizer(bundled_model_path())
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        assert render_prompt(tok, [{"role": "user", "content": "1+1"}], "chat").endswith("assistant\n")
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.3
        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_gguf_with_a_bad_merge_list(tmp_path, monkeypatch):
    import gguf

    from bupo.models import import_gguf
    from support.gguf import tiny_llama_gguf

    add = gguf.GGUFWriter.add_token_merges
    for bad in ("Q Z", "Hello", "H e e"):
        monkeypatch.setattr(gguf.GGUFWriter, "add_token_merges", lambda self, m, bad=bad: add(self, [*m, bad]))
        src = tmp_path / "bad.gguf"
        tiny_llama_gguf(src)
        with pytest.raises(ValueError) as info:
            import_gguf(src, tmp_path / "out", log=lambda s: None)
        msg = str(info.value)
        assert "\n" not in msg and f"#9 {bad!r}" in msg and "1 of the 10 BPE merges" in msg and "accepted:" in msg
        assert not (tmp_path / "out").exists()
