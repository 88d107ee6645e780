"""Per-token entropy columns -> per-layer summaries, and the boundary-layer rule (pure numpy, no torch).

Conventions (recorded in every output):

- Layers: the token columns use the 0-based layer ``k`` of the code (``H.attn_out.3`` is layer k=3); the summary
  lists are indexed by position ``i`` = 0-based layer ``k``, i.e. element ``i`` is paper layer ``l = i + 1``;
  :func:`boundary_layer` returns a 1-based paper layer.
- Entropies in nats.
- Token columns: ``H.<stream>.<k>`` = entropy of the projected stream at each analysed position (streams of
  :mod:`bupo.internal.streams`; ``H.resid_pre.0`` is the embedding output H^0), ``H.final`` = the model's real
  policy, ``logp.resid_post.<k>`` / ``logp.final`` = log-prob of the realised next token,
  ``top1.resid_post.<k>`` / ``top1.final`` = arg-max token id.
- Entropy change conventions (paper Eq. 11-13 and the official script for ``"bupo"``):

  ==========  =========================================  =================================
  quantity    ``bupo`` (default)                          ``residual``
  ==========  =========================================  =================================
  ΔH_layer    H(resid_post_k) - H(resid_pre_k)            same
  ΔH_attn     H(attn_out_k) - H(attn_in_k)                H(resid_mid_k) - H(resid_pre_k)
  ΔH_ffn      H(mlp_out_k) - H(mlp_in_k)                  H(resid_post_k) - H(resid_mid_k)
  ==========  =========================================  =================================

  with resid_pre_k = resid_post_{k-1} for k > 0 (so only ``H.resid_pre.0`` is stored) and
  attn_in / mlp_in the *normalised* module inputs (input_layernorm(H^{l-1}), post_attention_layernorm(H_mid)).

Every ΔH is formed per token and then averaged (paper App. A.3), so its standard error is the standard error of
a per-token difference, not a combination of two standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

CONVENTIONS = ("bupo", "residual")

#: streams each convention needs (besides ``resid_pre`` of layer 0 and the final policy)
CONVENTION_STREAMS: dict[str, tuple[str, ...]] = {
    "bupo": ("attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post"),
    "residual": ("attn_out", "resid_mid", "mlp_out", "resid_post"),
}

DEFAULT_BOUNDARY_TOL = 0.1


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown delta convention {convention!r}; accepted: {', '.join(CONVENTIONS)}")
    return convention


def entropy_col(stream: str, layer: int) -> str:
    return f"H.{stream}.{layer}"


def required_columns(num_layers: int, convention: str) -> list[str]:
    """The token columns :func:`derive` needs for ``convention``."""
    check_convention(convention)
    cols = [entropy_col("resid_pre", 0)]
    for s in CONVENTION_STREAMS[convention]:
        cols += [entropy_col(s, k) for k in range(num_layers)]
    cols += [f"logp.resid_post.{k}" for k in range(num_layers)] + [f"top1.resid_post.{k}" for k in range(num_layers)]
    return cols + ["H.final", "logp.final", "top1.final"]


def derive(cols: Mapping[str, np.ndarray], num_layers: int, convention: str) -> dict[str, np.ndarray]:
    """Per-token quantities of one block of tokens.

    Returns ``{key: array}`` in float64 (entropy columns are fp32 from the hooks; the differences are taken here):
    shape ``[n, L]`` for the per-layer keys ``layer_entropy``, ``attn_entropy``, ``ffn_entropy``,
    ``attn_input_entropy``, ``ffn_input_entropy``, ``layer_entropy_change``, ``attn_entropy_change``,
    ``ffn_entropy_change``, ``layer_logprob``, ``layer_top1_agreement``; shape ``[n]`` for the scalars
    ``embed_entropy``, ``final_entropy``, ``final_logprob``.
    """
    check_convention(convention)
    missing = [c for c in required_columns(num_layers, convention) if c not in cols]
    if missing:
        raise ValueError(f"token columns missing for convention {convention!r}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    L = num_layers

    def stack(stream: str, prefix: str = "H") -> np.ndarray:
        return np.stack([np.asarray(cols[f"{prefix}.{stream}.{k}"], dtype=np.float64) for k in range(L)], axis=1)

    post = stack("resid_post")
    h0 = np.asarray(cols[entropy_col("resid_pre", 0)], dtype=np.float64)
    pre = np.concatenate([h0[:, None], post[:, :-1]], axis=1)  # H^{l-1}
    attn, ffn = stack("attn_out"), stack("mlp_out")
    out = {
        "layer_entropy": post,
        "attn_entropy": attn,
        "ffn_entropy": ffn,
        "layer_entropy_change": post - pre,
        "layer_logprob": stack("resid_post", "logp"),
        "layer_top1_agreement": (stack("resid_post", "top1") == np.asarray(cols["top1.final"])[:, None]).astype(np.float64),
        "embed_entropy": h0,
        "final_entropy": np.asarray(cols["H.final"], dtype=np.float64),
        "final_logprob": np.asarray(cols["logp.final"], dtype=np.float64),
    }
    if f"rms.resid_post.{L - 1}" in cols:  # optional: the residual stream's RMS (bupo analyze measures it)
        out["resid_rms"] = stack("resid_post", "rms")
    if convention == "bupo":
        attn_in, ffn_in = stack("attn_in"), stack("mlp_in")
        out.update(attn_input_entropy=attn_in, ffn_input_entropy=ffn_in,
                   attn_entropy_change=attn - attn_in, ffn_entropy_change=ffn - ffn_in)
    else:
        mid = stack("resid_mid")
        out.update(attn_input_entropy=pre, ffn_input_entropy=mid,
                   attn_entropy_change=mid - pre, ffn_entropy_change=post - mid)
    return out


@dataclass
class _Moments:
    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> tuple[int, np.ndarray]:
        """Merge a block ``x`` [n, ...] (Chan et al. parallel update); returns the block's (n, mean)."""
        nb = x.shape[0]
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
        else:
            n = self.n + nb
            d = mb - self.mean
            self.mean = self.mean + d * (nb / n)
            self.m2 = self.m2 + m2b + d * d * (self.n * nb / n)
            self.n = n
        return nb, mb


@dataclass
class Aggregator:
    """Streaming per-layer means with token-level and by-sample (cluster-robust) standard errors.

    Feed one sample at a time with :meth:`add_sample` (memory: O(#samples x #quantities), never O(#tokens)).
    """

    num_layers: int
    convention: str = "bupo"
    _tok: dict[str, _Moments] = field(default_factory=dict)
    _per_sample: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_convention(self.convention)

    def add_sample(self, cols: Mapping[str, np.ndarray]) -> None:
        q = derive(cols, self.num_layers, self.convention)
        n = next(iter(q.values())).shape[0]
        if n == 0:
            raise ValueError("a sample with no analysed tokens cannot be aggregated (it must be skipped and counted)")
        for key, x in q.items():
            nb, mb = self._tok.setdefault(key, _Moments()).add(x)
            self._per_sample.setdefault(key, []).append((nb, mb))

    @property
    def num_samples(self) -> int:
        return len(next(iter(self._per_sample.values()), []))

    @property
    def num_tokens(self) -> int:
        m = next(iter(self._tok.values()), None)
        return 0 if m is None else m.n

    def result(self) -> dict[str, object]:
        """``{key: mean, key_se: token-level SE, key_se_by_sample: cluster-robust SE or None}`` (lists for layer keys)."""
        if self.num_tokens == 0:
            raise ValueError("no tokens were aggregated")
        out: dict[str, object] = {}
        for key, m in self._tok.items():
            mean = m.mean
            se = np.sqrt(m.m2 / (m.n - 1) / m.n) if m.n > 1 else np.full_like(mean, np.nan)
            blocks = self._per_sample[key]
            c = len(blocks)
            if c > 1:
                ns = np.array([b[0] for b in blocks], dtype=np.float64)
                means = np.stack([b[1] for b in blocks])
                resid = (means - mean) * ns.reshape((-1,) + (1,) * (means.ndim - 1))
                se_cl = np.sqrt(c / (c - 1) * (resid**2).sum(axis=0)) / m.n
            else:
                se_cl = None
            out[key] = _tolist(mean)
            out[f"{key}_se"] = _tolist(se)
            out[f"{key}_se_by_sample"] = None if se_cl is None else _tolist(se_cl)
        return out


def _tolist(x: np.ndarray):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        v = float(x)
        return None if math.isnan(v) else v
    return [None if math.isnan(v) else float(v) for v in x.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# the boundary layer


@dataclass(frozen=True)
class Boundary:
    """The boundary-layer rule's result and its diagnostics (see :func:`boundary_layer`)."""

    layer: int | None  # 1-based paper layer, None when there is no exploration stage
    tau: float
    tol: float
    scores: list[float]  # prefix sums C(b), b = 1..L
    stages: list[str]  # per layer: "+" (ΔH > tau), "-" (ΔH < -tau), "0" otherwise
    note: str


def boundary_details(ffn_delta_means: Sequence[float], *, tol: float = DEFAULT_BOUNDARY_TOL) -> Boundary:
    """The boundary layer with diagnostics; never raises for a well-formed sequence (``layer`` may be None).

    Rule (paper §2 / gotcha 13: "the last layer with ΔH_FFN > 0 before the FFN turns to integration /
    convergence"), made robust to near-zero noise in the integration stage:

    1. ``tau = tol * max_l max(m_l, 0)`` — a tolerance relative to the model's own largest FFN expansion
       (Qwen and Llama differ ~50x in scale, so an absolute threshold cannot work);
    2. ``C(b) = sum_{l <= b} (m_l - tau)`` for b = 1..L;
    3. boundary = the smallest ``b`` maximising ``C(b)``.

    A layer adds to the score only if its mean ΔH_FFN exceeds tau, so the boundary is where the leading
    exploration mass ends: short dips inside a long positive run are bridged when the run resumes with enough
    mass (Llama: weakly positive almost everywhere -> penultimate layer), while a small positive blip after a
    stretch of ≈0 layers does not outweigh the deficit of that stretch (Qwen3-4B: + for 1-6, ≈0 for 7-26,
    - for 27-36 -> layer 6). If no layer has m_l > tau (all ≤ 0) there is no exploration stage: ``layer`` is
    None. If every layer is above tau the boundary is L (no convergence stage).
    """
    m = np.asarray(ffn_delta_means, dtype=np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"ffn_delta_means must be a non-empty 1-D sequence (one mean per layer), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("ffn_delta_means contains NaN or infinite values")
    if not (isinstance(tol, int | float) and 0 <= tol < 1):
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    tau = float(tol * max(m.max(), 0.0))
    scores = np.cumsum(m - tau)
    stages = ["+" if v > tau else ("-" if v < -tau else "0") for v in m]
    if not np.any(m > tau):
        return Boundary(None, tau, tol, scores.tolist(), stages,
                        "no layer has mean ΔH_FFN > 0: no exploration stage, so no boundary layer")
    b = int(np.argmax(scores)) + 1  # argmax returns the first maximum
    note = f"exploration stage ends at paper layer {b} of {m.size}"
    if b == m.size:
        note += " (ΔH_FFN stays positive to the last layer: no convergence stage; k = L-1 is the full depth)"
    return Boundary(b, tau, tol, scores.tolist(), stages, note)


def boundary_layer(ffn_delta_means: Sequence[float], *, tol: float = DEFAULT_BOUNDARY_TOL) -> int:
    """The paper's boundary layer (1-based ``l``; the internal layer to train is ``k = l - 1``).

    ``ffn_delta_means[i]`` is the mean ΔH_FFN of paper layer ``i + 1``. See :func:`boundary_details` for the
    exact rule. Raises ValueError when no layer expands entropy (no exploration stage).
    """
    res = boundary_details(ffn_delta_means, tol=tol)
    if res.layer is None:
        raise ValueError(res.note)
    return res.layer


# ---------------------------------------------------------------------------------------------------------------
# projection health: is the internal policy readable at all?

#: a layer's policy is *collapsed* when its mean entropy is below this fraction of the model's own output entropy ...
COLLAPSE_ENTROPY_FRACTION = 0.5
#: ... while its arg-max agrees with the model's own arg-max on fewer than this fraction of tokens
COLLAPSE_MAX_AGREEMENT = 0.1
#: the projection is *degenerate* when at least this fraction of the layers below the last are collapsed
DEGENERATE_LAYER_FRACTION = 0.5

HEALTH_RULE = (
    f"layer k is collapsed when mean H(pi^k) < {COLLAPSE_ENTROPY_FRACTION} x mean H(pi_theta) (near one-hot) and "
    f"top-1(pi^k) = top-1(pi_theta) on < {COLLAPSE_MAX_AGREEMENT:.0%} of tokens (confident and wrong); the "
    f"projection is degenerate when >= {DEGENERATE_LAYER_FRACTION:.0%} of layers 0..L-2 are collapsed"
)


def layer_collapsed(entropy: float, agreement: float, final_entropy: float) -> bool:
    """One layer's policy is near one-hot *and* disagrees with the model's own policy (see :data:`HEALTH_RULE`)."""
    return bool(entropy < COLLAPSE_ENTROPY_FRACTION * final_entropy and agreement < COLLAPSE_MAX_AGREEMENT)


def projection_health(stats: Mapping[str, object], *, projection: str,
                      final_norm_weight: Mapping[str, float] | None = None) -> dict[str, object]:
    """Whether the layer policies of one projection are usable, with the numbers that decide it.

    ``stats`` holds the per-layer means ``layer_entropy``, ``layer_top1_agreement``, ``layer_logprob``, the scalar
    ``final_entropy`` and, when measured, ``resid_rms`` (RMS of the residual stream H^k). Returns a JSON-ready
    dict: ``degenerate``, ``collapsed_layers`` (0-based k), the inputs per layer, ``rule``, ``message`` (the
    numbers in one sentence) and ``advice`` (what to use instead). The residual RMS against the final norm's gain
    explains a degenerate ``raw`` projection: lm_head(h) is lm_head(final_norm(h)) at temperature
    ~ gain / rms(h), so a residual stream that grows to hundreds makes every raw layer policy near one-hot.
    """
    H = np.asarray(stats["layer_entropy"], dtype=np.float64)
    agree = np.asarray(stats["layer_top1_agreement"], dtype=np.float64)
    logp = np.asarray(stats["layer_logprob"], dtype=np.float64)
    hf = float(stats["final_entropy"])
    L = H.size
    collapsed = [k for k in range(L) if layer_collapsed(H[k], agree[k], hf)]
    below = [k for k in collapsed if k < L - 1]
    denom = max(L - 1, 1)
    degenerate = len(below) >= DEGENERATE_LAYER_FRACTION * denom and len(below) > 0
    rms = stats.get("resid_rms")
    gain = None if not final_norm_weight else final_norm_weight.get("rms")
    out: dict[str, object] = {
        "projection": projection,
        "degenerate": bool(degenerate),
        "collapsed_layers": collapsed,
        "collapsed_fraction": round(len(below) / denom, 4),
        "rule": HEALTH_RULE,
        "final_entropy": hf,
        "layer_entropy": H.tolist(),
        "layer_top1_agreement": agree.tolist(),
        "layer_logprob": logp.tolist(),
        "layer_cross_entropy_gap": (-logp - H).tolist(),  # E[-log pi^k(x)] - H(pi^k): >> 0 = overconfident
        "resid_rms": None if rms is None else list(rms),
        "final_norm_gain_rms": gain,
        "message": None,
        "advice": None,
    }
    if degenerate:
        ks = np.asarray(below)
        msg = (f"the {projection} layer policies are degenerate: {len(below)} of {denom} layers below the last are "
               f"near one-hot and disagree with the model's own policy (mean entropy {H[ks].min():.3g}..{H[ks].max():.3g}"
               f" nats vs {hf:.3g} for the model's output; top-1 agreement {agree[ks].max():.2f} at most; "
               f"realised-token log-prob down to {logp[ks].min():.4g})")
        if rms is not None and gain:
            r = np.asarray(rms, dtype=np.float64)
            msg += (f"; residual RMS grows {r[0]:.3g} -> {r.max():.3g} against a final-norm gain of {gain:.3g}, so "
                    f"lm_head(h) is the normed policy at ~{r[ks].min() / gain:.3g}-{r[ks].max() / gain:.3g}x inverse "
                    "temperature")
        out["message"] = msg
        out["advice"] = projection_advice(projection)
    return out


def projection_advice(projection: str) -> str:
    if projection == "raw":
        return ("use projection final_norm (lm_head(final_norm(h)), the paper's 'with LN' ablation, "
                "Table 5): `bupo analyze --projection final_norm`, `bupo train --internal-projection final_norm`")
    return ("no bupo projection reads this model's layers as a usable policy; give `--internal-layer K` explicitly "
            "only with evidence (e.g. `bupo lens`)")


# ---------------------------------------------------------------------------------------------------------------
# the answer: a usable internal layer, or why there is none

BOUNDARY_RULE = (
    "boundary = smallest b maximising C(b) = sum_{l<=b} (mean ΔH_FFN^l - tau), tau = tol * max(0, max_l mean "
    "ΔH_FFN^l) (the end of the leading run of entropy-expanding FFN layers); it is used only when the projection "
    "is not degenerate (projection_health) and 1 <= b <= L-1 (b = L would train the full policy); otherwise "
    "there is no boundary and boundary.reason says why (docs/analysis.md)"
)


def boundary_options(num_layers: int, *, degenerate: bool, projection: str,
                     no_convergence: bool = False) -> list[str]:
    """What a user can do when there is no usable boundary (shown by bupo analyze and bupo train)."""
    L = num_layers
    options = []
    if degenerate and projection == "raw":
        options.append("re-analyse with --projection final_norm and train with --internal-projection final_norm")
    if no_convergence and L >= 2:
        options.append(f"--internal-layer {L - 2} (the penultimate layer: the paper's choice for Llama, whose FFN "
                       "ΔH is positive up to its last layer)")
    options.append(f"--internal-layer K with K in 0..{max(L - 2, 0)} chosen from the report's per-layer table or "
                   "`bupo lens`")
    options.append("--algo grpo (no internal layer)")
    return options


def boundary_record(bd: Boundary, health: Mapping[str, object], *, delta: str, projection: str,
                    ffn_delta_means: Sequence[float]) -> dict[str, object]:
    """summary.json's ``boundary_layer`` (1-based or None), ``suggested_internal_layer`` (0-based or None) and
    ``boundary`` (the rule, its inputs, its answer and, when there is none, ``reason`` and ``options``)."""
    L = len(bd.scores)
    reason = None
    if health.get("degenerate"):
        reason = f"no usable boundary: {health['message']}"
    elif bd.layer is None:
        reason = (f"no usable boundary: no layer has mean ΔH_FFN > 0 under projection {projection} and ΔH "
                  f"convention {delta} (no exploration stage)")
    elif bd.layer == L:
        reason = (f"no usable boundary: mean ΔH_FFN stays positive to the last layer under projection {projection} "
                  f"and ΔH convention {delta} (no convergence stage), so the rule answers paper layer {L} = k {L - 1}, "
                  + ("the model's own policy: BuPO's internal phase would be GRPO" if projection == "final_norm" else
                     "the last layer's residual without the final norm (not the model's own policy, which is "
                     "normed; the official code's hidden_states[L] is): nothing below it to train bottom-up"))
    options = None if reason is None else boundary_options(
        L, degenerate=bool(health.get("degenerate")), projection=projection, no_convergence=bd.layer == L)
    layer = None if reason else bd.layer
    return {
        "boundary_layer": layer,
        "suggested_internal_layer": None if layer is None else layer - 1,
        "boundary": {
            "rule": BOUNDARY_RULE,
            "inputs": {"ffn_entropy_change": [float(x) for x in ffn_delta_means], "delta_convention": delta,
                       "projection": projection, "projection_degenerate": bool(health.get("degenerate"))},
            "tol": bd.tol, "tau": bd.tau, "scores": bd.scores, "stages": bd.stages,
            "ffn_rule_layer": bd.layer,
            "answer": None if layer is None else {"boundary_layer": layer, "internal_layer": layer - 1},
            "note": reason or bd.note,
            "reason": reason,
            "options": options,
        },
    }
