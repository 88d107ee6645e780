"""Prompt templates: turn a row's chat messages into the exact prompt string the model sees.

Templates (paper App. A.2):

- ``qwen3_no_thinking``: the tokenizer's chat template with ``enable_thinking=False`` and
  ``add_generation_prompt=True``. For Qwen3 this ends the prompt with an empty think block
  ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` (the paper's Qwen3 runs). A tokenizer whose
  template ignores ``enable_thinking`` is rejected (use ``chat`` for it).
- ``chat``: the tokenizer's own chat template, ``add_generation_prompt=True`` (the paper's Llama /
  OctoThinker script, applied to the parquet's [system, user] messages).
- ``octothinker``: the paper's plain-text template (Fig. 10); only the last user message is used,
  the system message is dropped, no tokenizer needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bupo.data.chat_render import apply_chat_template, check_chat_template

__all__ = ["OCTOTHINKER_TEMPLATE", "RECORDED_TEMPLATE_KEY", "TEMPLATES", "apply_chat_template", "check_chat_template",
           "record_template", "recorded_template", "render_prompt", "resolve_template", "user_problem"]

OCTOTHINKER_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. User: You must put your answer inside \\boxed{} and Your final answer will be extracted "
    "automatically by the \\boxed{} tag.\n{problem} Assistant:"
)

TEMPLATES: tuple[str, ...] = ("qwen3_no_thinking", "chat", "octothinker")
_EMPTY_THINK_END = "</think>\n\n"
# tokenizer_config.json key holding the template a model was trained with (bupo train writes it, auto reads it)
RECORDED_TEMPLATE_KEY = "bupo_template"


def record_template(tokenizer: Any, template: str) -> None:
    """Remember ``template`` in the tokenizer, so ``save_pretrained`` writes it to ``tokenizer_config.json``
    (key :data:`RECORDED_TEMPLATE_KEY`) and ``--template auto`` picks it when the saved model is loaded again."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; accepted: {', '.join(TEMPLATES)}")
    tokenizer.init_kwargs[RECORDED_TEMPLATE_KEY] = template


def recorded_template(tokenizer: Any) -> str | None:
    """The template recorded by :func:`record_template` (None when the tokenizer holds none or an unknown one)."""
    value = (getattr(tokenizer, "init_kwargs", None) or {}).get(RECORDED_TEMPLATE_KEY)
    return value if value in TEMPLATES else None


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r:.120}")
    return list(messages)


def user_problem(messages: Sequence[dict]) -> str:
    """The content of the last user message (the problem text)."""
    for m in reversed(_check_messages(messages)):
        if m["role"] == "user":
            return m["content"]
    raise ValueError(f"no user message among roles {[m['role'] for m in messages]}")


def _apply_chat_template(tokenizer: Any, messages: list[dict], template: str, **extra: Any) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"template {template!r} needs a tokenizer with a chat template, and this one has none; "
            f"use template 'octothinker' (plain text) or a tokenizer that defines chat_template"
        )
    text = apply_chat_template(tokenizer, messages, **extra)
    if not isinstance(text, str):  # some versions return a list for batched input
        raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def render_prompt(tokenizer: Any, messages: Sequence[dict], template: str = "chat") -> str:
    """The prompt string for ``messages`` under ``template`` (one of :data:`TEMPLATES`).

    ``tokenizer`` may be None for ``octothinker``. Raises ValueError for an unknown template, malformed
    messages, a tokenizer without a chat template (``chat``/``qwen3_no_thinking``), or a chat template
    that ignores ``enable_thinking`` (``qwen3_no_thinking``).
    """
    msgs = _check_messages(messages)
    if template == "octothinker":
        # str.replace, not str.format: the template text contains literal braces (\boxed{})
        return OCTOTHINKER_TEMPLATE.replace("{problem}", user_problem(msgs))
    if template == "chat":
        return _apply_chat_template(tokenizer, msgs, template)
    if template == "qwen3_no_thinking":
        text = _apply_chat_template(tokenizer, msgs, template, enable_thinking=False)
        if not text.endswith(_EMPTY_THINK_END):
            raise ValueError(
                "template 'qwen3_no_thinking' needs a Qwen3-style chat template that honours "
                "enable_thinking=False (the prompt should end with an empty <think></think> block); this "
                f"tokenizer's prompt ends with {text[-40:]!r}. Use template 'chat' for it."
            )
        return text
    raise ValueError(f"unknown template {template!r}; accepted: {', '.join(TEMPLATES)}")


def resolve_template(tokenizer: Any, template: str) -> str:
    """``auto`` -> the template the model was trained with when ``bupo train`` recorded one in its tokenizer
    (:func:`bupo.data.templates.recorded_template`), else ``qwen3_no_thinking`` if the tokenizer's chat template
    honours enable_thinking, else ``chat`` if it has a chat template, else ``octothinker``; other names are checked
    and returned."""
    if template != "auto":
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; accepted: auto, {', '.join(TEMPLATES)}")
        return template
    recorded = recorded_template(tokenizer)
    if recorded is not None:
        return recorded
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return "octothinker"
    probe = [{"role": "user", "content": "1+1"}]
    try:
        render_prompt(tokenizer, probe, "qwen3_no_thinking")
        return "qwen3_no_thinking"
    except ValueError:
        return "chat"
