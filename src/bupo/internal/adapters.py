"""Architecture adapters: the one place in bupo that knows model families.

An adapter maps a Hugging Face decoder LM (keyed by ``config.model_type``) onto the roles the paper's
residual-stream decomposition needs (paper §2.1, Eq. 4):

    A^l = what attention writes into the residual    (o_proj output; Gemma-2/3, OLMo-2: after the post-attn norm)
    F^l = what the FFN writes into the residual      (MLP output;    Gemma-2/3, OLMo-2: after the post-FFN norm)
    H^(2l-1) = H^(2l-2) + A^l,   H^l = H^(2l) = H^(2l-1) + F^l

Every supported family runs its decoder layers as ``for layer in self.layers[: config.num_hidden_layers]``
(transformers 5.x), which is what lets :func:`bupo.internal.policy.internal_policy` stop the model's own
forward after layer ``k`` by truncating the config. Families that do not loop that way must not be
registered with ``truncatable=True``.

Register a new family with :func:`register_adapter` (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """Where the residual-stream roles live in one model family.

    Attribute paths are dotted paths: ``backbone``/``lm_head`` from the ``*ForCausalLM`` module,
    ``layers``/``embed``/``final_norm`` from the backbone, the rest from one decoder layer. A role that the
    family does not have is ``None``.
    """

    model_types: tuple[str, ...]
    backbone: str = "model"
    lm_head: str = "lm_head"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    attn: str = "self_attn"
    mlp: str = "mlp"
    #: norm applied to the residual before attention (pre-norm families); None for post-norm (OLMo-2)
    input_norm: str | None = "input_layernorm"
    #: norm applied to the residual before the MLP; None for post-norm (OLMo-2)
    pre_mlp_norm: str | None = "post_attention_layernorm"
    #: norm applied to the attention output before the residual add (Gemma-2/3 sandwich, OLMo-2)
    post_attn_norm: str | None = None
    #: norm applied to the MLP output before the residual add (Gemma-2/3 sandwich, OLMo-2)
    post_mlp_norm: str | None = None
    #: config attribute of final-logit tanh softcapping (Gemma-2/3)
    softcap_attr: str | None = None
    #: the decoder loop reads ``config.num_hidden_layers`` (see module docstring)
    truncatable: bool = True
    notes: str = ""


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> Adapter:
    """Register ``adapter`` for each of its ``model_types``.

    Example for a Llama-like family called ``mymodel``::

        from bupo.internal.adapters import Adapter, register_adapter
        register_adapter(Adapter(model_types=("mymodel",)))

    Only set ``truncatable=True`` if the family's backbone loops over
    ``self.layers[: self.config.num_hidden_layers]``; the internal-policy context manager relies on it.
    """
    for model_type in adapter.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"an adapter for model_type {model_type!r} is already registered; pass overwrite=True")
        _REGISTRY[model_type] = adapter
    return adapter


_LLAMA_LIKE = Adapter(model_types=("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "phi3"))
register_adapter(_LLAMA_LIKE)
register_adapter(
    replace(
        _LLAMA_LIKE,
        model_types=("gemma2", "gemma3_text"),
        pre_mlp_norm="pre_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        softcap_attr="final_logit_softcapping",
        notes="sandwich norms; (1+w) RMSNorm and sqrt(d) embedding scale live inside the modules",
    )
)
register_adapter(
    replace(
        _LLAMA_LIKE,
        model_types=("olmo2",),
        input_norm=None,
        pre_mlp_norm=None,
        post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        notes="post-norm: modules read the raw residual, their outputs are normed before the add",
    )
)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"cannot read config.model_type from {type(model_or_config).__name__}")
    return model_type


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model (or its config). Unknown families raise a ValueError that says what to do."""
    model_type = _model_type(model_or_config)
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "To add a family, describe where its modules live with "
            "bupo.internal.adapters.register_adapter(Adapter(model_types=(...), ...))."
        ) from None


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DeepSpeed / accelerate wrappers keep the HF model under .module; DeepSpeedEngine also forwards unknown
    # attributes (config, model, ...) to it, so "has no config" cannot tell a wrapper: a model class has config_class
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(type(model), "config_class"):
        model = model.module
    return model


@dataclass
class ModelParts:
    """Resolved modules of one model instance (see :func:`parts`)."""

    model: nn.Module
    adapter: Adapter
    backbone: nn.Module
    embed: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    softcap: float | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self):
        return self.backbone.config

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    def layer_module(self, layer: int, role: str) -> nn.Module | None:
        """The module playing ``role`` (an Adapter field such as ``"attn"``, ``"post_attn_norm"``) in ``layer``."""
        return _get(self.layers[layer], getattr(self.adapter, role))


def parts(model: nn.Module) -> ModelParts:
    """Locate embeddings, decoder layers, final norm, lm_head and softcap of ``model``."""
    model = _unwrap(model)
    adapter = get_adapter(model)
    backbone = _get(model, adapter.backbone)
    lm_head = _get(model, adapter.lm_head)
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: lm_head is {type(lm_head).__name__}, expected nn.Linear")
    softcap = getattr(model.config, adapter.softcap_attr, None) if adapter.softcap_attr else None
    return ModelParts(
        model=model,
        adapter=adapter,
        backbone=backbone,
        embed=_get(backbone, adapter.embed),
        layers=_get(backbone, adapter.layers),
        final_norm=_get(backbone, adapter.final_norm),
        lm_head=lm_head,
        softcap=float(softcap) if softcap else None,
    )


PROJECTIONS = ("raw", "final_norm")


def check_projection(projection: str) -> str:
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; accepted: {', '.join(PROJECTIONS)}")
    return projection


def apply_head_postprocessing(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The model's own final-logit post-processing (Gemma-2/3 tanh softcap), applied to any projection."""
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
