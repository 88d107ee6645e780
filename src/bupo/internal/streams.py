"""Capture of the residual stream and module outputs with forward hooks.

Streams, per 0-based decoder layer ``l`` (paper layer l+1), in the paper's notation (§2.1, Eq. 4):

    resid_pre   H^{l-1}           input of the decoder layer (layer 0: the embedding output)
    attn_in     input_layernorm(H^{l-1})            the normalised attention input the official script compares A^l with
    attn_out    A^l               what attention writes into the residual (Gemma-2/3, OLMo-2: after the post-attn norm)
    resid_mid   H^{l-1} + A^l
    mlp_in      post_attention_layernorm(resid_mid) the normalised FFN input the official script compares F^l with
    mlp_out     F^l               what the FFN writes into the residual (sandwich/post-norm families: after its norm)
    resid_post  H^l = resid_mid + F^l

Post-norm families (OLMo-2) feed the raw residual to their modules, so there ``attn_in``/``mlp_in`` are the same
tensors as ``resid_pre``/``resid_mid``. Only hooks are used: attention maps are never requested, SDPA/flash
attention stays on, and every hook is removed on exit.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from bupo.internal.adapters import ModelParts, parts
from bupo.internal.stats import Projector, TokenStats

STREAMS: tuple[str, ...] = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


def _check_selection(p: ModelParts, streams: Iterable[str], layers: Iterable[int] | None) -> tuple[list[str], list[int]]:
    streams = list(streams)
    bad = [s for s in streams if s not in STREAMS]
    if bad or not streams:
        raise ValueError(f"unknown stream(s) {bad or streams}; accepted: {', '.join(STREAMS)}")
    layers = list(range(p.num_layers)) if layers is None else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < p.num_layers:
            raise ValueError(f"layer {layer!r} out of range: 0-based layers 0..{p.num_layers - 1}")
    return streams, layers


def _source(p: ModelParts, stream: str, layer: int) -> tuple[torch.nn.Module, str]:
    """(module, 'in' | 'out'): the hook point whose input or output *is* the stream."""
    a, block = p.adapter, p.layers[layer]
    role = {
        "resid_pre": (block, "in"),
        "resid_post": (block, "out"),
        "attn_out": (p.layer_module(layer, "post_attn_norm" if a.post_attn_norm else "attn"), "out"),
        "mlp_out": (p.layer_module(layer, "post_mlp_norm" if a.post_mlp_norm else "mlp"), "out"),
        "resid_mid": (p.layer_module(layer, "pre_mlp_norm" if a.pre_mlp_norm else "mlp"), "in"),
    }
    if stream == "attn_in":
        return (p.layer_module(layer, "input_norm"), "out") if a.input_norm else role["resid_pre"]
    if stream == "mlp_in":
        return (p.layer_module(layer, "pre_mlp_norm"), "out") if a.pre_mlp_norm else role["resid_mid"]
    return role[stream]


def _first_tensor(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise RuntimeError("could not find the hidden-state input of a hooked module")


@contextlib.contextmanager
def tap(
    model: torch.nn.Module,
    points: Iterable[tuple[str, int]],
    callback: Callable[[str, int, torch.Tensor], None],
) -> Iterator[ModelParts]:
    """Call ``callback(stream, layer, tensor[B, T, d])`` for each requested (stream, layer) during forwards."""
    p = parts(model)
    by_hook: dict[tuple[int, str], list[tuple[str, int]]] = defaultdict(list)
    modules: dict[int, torch.nn.Module] = {}
    for stream, layer in points:
        module, kind = _source(p, stream, layer)
        by_hook[(id(module), kind)].append((stream, layer))
        modules[id(module)] = module
    handles = []

    def make(names, kind):
        def emit(t):
            for stream, layer in names:
                callback(stream, layer, t)

        if kind == "in":
            return lambda mod, args, kwargs: emit(_first_tensor(args, kwargs))
        return lambda mod, args, out: emit(out[0] if isinstance(out, tuple) else out)

    try:
        for (mid, kind), names in by_hook.items():
            fn = make(names, kind)
            if kind == "in":
                handles.append(modules[mid].register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(modules[mid].register_forward_hook(fn))
        yield p
    finally:
        for h in handles:
            h.remove()


def _take(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` of ``t`` [B, T, ...] flattened to [B*T, ...]; an index gathers without the device sync
    that a boolean mask costs (the mask's nonzero is computed once per forward, not once per hook)."""
    flat = t.reshape(-1, *t.shape[2:])
    return flat if index is None else flat.index_select(0, index)


@contextlib.contextmanager
def capture_streams(
    model: torch.nn.Module,
    *,
    streams: Iterable[str] = STREAMS,
    layers: Iterable[int] | None = None,
    positions: torch.Tensor | None = None,
) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Record raw stream tensors during the forwards run inside the block.

    Yields a dict ``{(stream, layer): tensor}``, filled as the model runs: [B, T, d], or [N, d] when a boolean
    ``positions`` mask [B, T] is given. Tensors are detached; the last forward wins.
    """
    p = parts(model)
    streams, layers = _check_selection(p, streams, layers)
    store: dict[tuple[str, int], torch.Tensor] = {}
    index = None if positions is None else positions.reshape(-1).nonzero().squeeze(1)

    def keep(stream, layer, t):
        store[(stream, layer)] = (t if index is None else _take(t, index)).detach()

    with tap(model, [(s, la) for s in streams for la in layers], keep):
        yield store


@dataclass
class StreamStats:
    """Statistics of every requested (stream, layer) policy plus the model's real policy (``final``)."""

    stats: dict[tuple[str, int], TokenStats]
    final: TokenStats
    num_layers: int
    projection: str
    num_positions: int

    def entropy(self, stream: str) -> torch.Tensor:
        """[num_layers_captured, N] entropies of one stream, layers in increasing order."""
        layers = sorted(la for (s, la) in self.stats if s == stream)
        return torch.stack([self.stats[(stream, la)].entropy for la in layers])


def stream_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    streams: Iterable[str] = STREAMS,
    layers: Iterable[int] | None = None,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    projection: str = "raw",
    chunk_size: int | None = None,
    projector: Projector | None = None,
) -> StreamStats:
    """One forward pass; per-token statistics of each (stream, layer) policy, computed inside the hooks.

    ``positions`` (bool [B, T]) selects the analysed tokens (default: all); ``targets`` (long [B, T]) is the
    token whose log-prob is recorded at each position (e.g. the realised next token). Stream tensors are
    reduced to [N] statistics as soon as they appear, so memory is O(T·d) for activations plus one chunk of
    logits, whatever the number of layers. ``resid_pre`` of layer l > 0 is the same tensor as ``resid_post`` of
    layer l - 1 and is not projected twice. ``final`` is the model's own policy (final norm, lm_head, softcap).
    """
    p = parts(model)
    streams, layers = _check_selection(p, streams, layers)
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor [batch, seq]")
    for name, t in (("attention_mask", attention_mask), ("positions", positions), ("targets", targets)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids shape {tuple(input_ids.shape)}")
    if positions is not None and positions.dtype != torch.bool:
        raise ValueError("positions must be a boolean mask [batch, seq]")
    projector = projector or Projector(model, projection)
    index = None if positions is None else positions.reshape(-1).nonzero().squeeze(1)
    sel_targets = None if targets is None else _take(targets, index)
    wanted = {(s, la) for s in streams for la in layers}
    derived = {(s, la) for (s, la) in wanted if s == "resid_pre" and la > 0 and ("resid_post", la - 1) in wanted}
    out: dict[tuple[str, int | str], TokenStats] = {}

    def reduce(stream, layer, t):
        out[(stream, layer)] = projector.stats(_take(t, index), targets=sel_targets, chunk_size=chunk_size)

    def reduce_final(mod, args, o):
        # the real policy: lm_head(final_norm(h_L)); the hooked output is already normed
        out[("final", "")] = projector.stats(_take(o, index), targets=sel_targets, chunk_size=chunk_size, normed=True)

    final_hook = p.final_norm.register_forward_hook(reduce_final)
    try:
        with torch.no_grad(), tap(model, sorted(wanted - derived), reduce):
            kwargs = {"use_cache": False}
            if "logits_to_keep" in _forward_params(p.model):
                kwargs["logits_to_keep"] = 1  # the model's own full logits are not needed
            p.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        final_hook.remove()
    out = {key: ts.cpu() for key, ts in out.items()}  # one device->host copy per forward, after it
    final = out.pop(("final", ""))
    for s, la in derived:
        out[(s, la)] = out[("resid_post", la - 1)]
    n = input_ids.numel() if index is None else index.numel()
    return StreamStats(stats=out, final=final, num_layers=p.num_layers, projection=projector.projection,
                       num_positions=n)


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
