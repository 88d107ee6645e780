"""``report.html``: one self-contained page (figures as base64 data URIs, inline CSS, the lens view's few lines of
inline script; nothing loaded from anywhere)."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from bupo.analysis.lens import prob_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.k{font-size:1.1em;background:#eef6ee;border:1px solid #9c9;
padding:.6em 1em;display:inline-block}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.pos{color:#1a7f37}.neg{color:#b42318}code{background:#f5f5f5;padding:0 .2em}
table.lensgrid td{text-align:center;font-family:monospace;font-size:.8em;min-width:5em;cursor:default}
table.lensgrid td:hover{outline:2px solid #d62728}#lensinfo{white-space:pre;font-family:monospace;font-size:.85em;
background:#fafafa;border:1px solid #ddd;padding:.5em;min-height:7em}
"""

#: the lens grid's hover panel: copies the hovered cell's details (its data-info) into #lensinfo; inline, no network
_LENS_JS = """<script>for(const t of document.querySelectorAll('table.lensgrid td[data-info]')){
t.addEventListener('mouseenter',()=>{document.getElementById('lensinfo').textContent=t.dataset.info;});}</script>"""


_SUP = re.compile(r"(π|H|A|F|</sub>)\^(\{[^}]*\}|[A-Za-z0-9]+)")
_SUB = re.compile(r"(π|ΔH)_?(θ|old|ref|Layer|ATTN|FFN|attn|ffn)")


def math_html(text: str) -> str:
    """``text`` HTML-escaped, with its maths written as HTML: ``π^k`` -> π<sup>k</sup>, ``H(A^l)`` ->
    H(A<sup>l</sup>), ``π_θ``/``πθ`` -> π<sub>θ</sub>, ``ΔH_FFN^l`` -> ΔH<sub>FFN</sub><sup>l</sup> (no script: the
    page stays self-contained)."""
    out = html.escape(text, quote=False)
    out = _SUB.sub(lambda m: f"{m.group(1)}<sub>{m.group(2)}</sub>", out)
    return _SUP.sub(lambda m: f"{m.group(1)}<sup>{m.group(2).strip('{}')}</sup>", out)


def img_tag(path: Path) -> str:
    """An <img> with the PNG embedded as a base64 data URI (self-contained pages)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _signed(v, se) -> str:
    if v is None:
        return "–"
    cls = "pos" if v > 0 else ("neg" if v < 0 else "")
    s = f"{v:+.4f}"
    if se is not None:
        s += f" ± {se:.4f}"
    return f'<span class="{cls}">{s}</span>'


def _layer_table(s: Mapping) -> str:
    L = int(s["num_layers"])
    stages = (s.get("boundary") or {}).get("stages") or [""] * L
    head = ("<tr><th>l (paper)</th><th>k (code)</th><th>H layer</th><th>ΔH layer ± SE</th><th>H attn</th>"
            "<th>ΔH attn ± SE</th><th>H FFN</th><th>ΔH FFN ± SE</th><th>FFN stage</th><th>log p(next)</th>"
            "<th>top-1 = final</th>" + ("<th>resid RMS</th>" if s.get("resid_rms") else "") + "</tr>")
    rows = []
    for i in range(L):
        mark = ' style="background:#eef6ee"' if s.get("boundary_layer") == i + 1 else ""
        rows.append(
            f"<tr{mark}><td>{i + 1}</td><td>{i}</td><td>{_fmt(s['layer_entropy'][i])}</td>"
            f"<td>{_signed(s['layer_entropy_change'][i], s['layer_entropy_change_se'][i])}</td>"
            f"<td>{_fmt(s['attn_entropy'][i])}</td>"
            f"<td>{_signed(s['attn_entropy_change'][i], s['attn_entropy_change_se'][i])}</td>"
            f"<td>{_fmt(s['ffn_entropy'][i])}</td>"
            f"<td>{_signed(s['ffn_entropy_change'][i], s['ffn_entropy_change_se'][i])}</td>"
            f"<td>{html.escape(stages[i] if i < len(stages) else '')}</td>"
            f"<td>{_fmt(s['layer_logprob'][i], 3)}</td><td>{_fmt(s['layer_top1_agreement'][i], 3)}</td>"
            + (f"<td>{_fmt(s['resid_rms'][i], 2)}</td>" if s.get("resid_rms") else "") + "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def lens_html(lens: Mapping) -> str:
    """The logit-lens table (:func:`bupo.analysis.lens.lens_table`) as HTML: per position, one row per layer."""
    projs = lens["projections"]
    out = []
    for block in lens["positions"]:
        nxt = "" if block["next_token"] is None else f"; actual next token <code>{html.escape(repr(block['next_token']))}</code>"
        out.append(f"<p>Position {block['position']} (context <code>…{html.escape(repr(block['context']))}</code>{nxt})</p>")
        head = "<tr><th>l (paper)</th><th>k (code)</th>" + "".join(
            f"<th>H {html.escape(p)}</th><th class=\"l\">top tokens {html.escape(p)}</th>" for p in projs) + "</tr>"
        rows = []
        for row in block["layers"]:
            cells = "".join(
                f"<td>{_fmt(row[p]['entropy'], 2)}</td><td class=\"l\">"
                + " ".join(f"<code>{html.escape(repr(t))}</code> {prob_text(q)}" for t, q in row[p]["top"]) + "</td>"
                for p in projs)
            rows.append(f"<tr><td>{row['paper_layer']}</td><td>{row['layer']}</td>{cells}</tr>")
        out.append(f"<table>{head}{''.join(rows)}</table>")
    return "".join(out)


def _shade(h: float, hmax: float) -> str:
    """Cell colours for entropy ``h`` on a white -> blue scale up to ``hmax`` (text white on dark cells)."""
    f = min(max(h / hmax, 0.0), 1.0) if hmax > 0 else 0.0
    r, g, b = (round(255 + f * (c - 255)) for c in (31, 119, 180))
    return f"background:rgb({r},{g},{b});color:{'#fff' if f > 0.55 else '#222'}"


def lens_grid_html(lens: Mapping) -> str:
    """The lens as a layer x position grid per projection (deepest layer on top, as tuned-lens draws it): each cell
    shows the layer's top token, is shaded by its entropy, and hovering it shows its top tokens and entropy."""
    blocks = lens["positions"]
    cells = [row[p]["entropy"] for b in blocks for row in b["layers"] for p in lens["projections"]]
    hmax = max([c for c in cells if c is not None] or [1.0])
    out = []
    for proj in lens["projections"]:
        head = "<tr><th>l (paper)</th>" + "".join(
            f"<th>{b['position']}<br><code>{html.escape(repr(b['context'][-8:]))}</code>"
            + ("" if b["next_token"] is None else f"<br>next <code>{html.escape(repr(b['next_token']))}</code>")
            + "</th>" for b in blocks) + "</tr>"
        rows = []
        for k in reversed(range(len(blocks[0]["layers"]) if blocks else 0)):
            tds = []
            for b in blocks:
                row = b["layers"][k]
                c = row[proj]
                top1 = c["top"][0][0] if c["top"] else ""
                info = (f"{proj}, layer l = {row['paper_layer']} (k = {row['layer']}), position {b['position']}\n"
                        f"H = {c['entropy']:.3f} nats\n" + "\n".join(f"{t!r}: {prob_text(q)}" for t, q in c["top"]))
                tds.append(f'<td style="{_shade(c["entropy"], hmax)}" title="{html.escape(info)}" '
                           f'data-info="{html.escape(info)}">{html.escape(repr(top1))}</td>')
            rows.append(f"<tr><th>{k + 1}</th>{''.join(tds)}</tr>")
        out.append(f"<h3>{html.escape(proj)}</h3><table class=\"lensgrid\">{head}{''.join(rows)}</table>")
    return ("<p>Each cell: the layer policy's most likely token; shade = its entropy (white 0 → blue "
            f"{hmax:.2f} nats); hover a cell for its top tokens and entropy.</p>" + "".join(out)
            + '<div id="lensinfo">hover a cell</div>' + _LENS_JS)


def _kv_table(items: Mapping) -> str:
    rows = []
    for k, v in items.items():
        val = json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)
        rows.append(f'<tr><th class="l">{html.escape(str(k))}</th><td class="l"><code>{html.escape(val)}</code></td></tr>')
    return f"<table>{''.join(rows)}</table>"


def _boundary_box(s: Mapping) -> str:
    """The boundary answer as one box: the layer (green), or why there is none (red when the projection is
    degenerate: that reason, its advice and the options said once)."""
    b, k = s.get("boundary_layer"), s.get("suggested_internal_layer")
    health = s.get("projection_health") or {}
    degenerate = bool(health.get("degenerate"))
    bad = ' style="background:#fdecea;border-color:#e99"'
    if b is not None:
        box = (f'<div class="k">Boundary layer <b>l = {b}</b> of {s["num_layers"]} &rarr; suggested internal layer '
               f"<b>k = {k}</b> (0-based; <code>bupo train --internal-layer {k}</code>)</div>")
        if degenerate:  # a boundary despite a degenerate projection: the warning gets its own box
            box += (f'<div class="k"{bad}>Degenerate projection: {math_html(str(health["message"]))}.<br>'
                    f'{math_html(str(health["advice"]))}</div>')
        return box
    bd = s.get("boundary") or {}
    opts = "".join(f"<li>{math_html(str(o))}</li>" for o in bd.get("options") or [])
    if degenerate:
        why = (f"Degenerate projection: {math_html(str(health['message']))}.<br>"
               f"{math_html(str(health['advice']))}")
    else:
        why = math_html(str(bd.get("note", "")))
    return (f'<div class="k"{bad if degenerate else ""}>No boundary layer{". " if degenerate else ": "}{why}'
            + (f"<br>Options:<ul>{opts}</ul>" if opts else "") + "</div>")


def render_report(summary: Mapping, figures: Mapping[str, Path]) -> str:
    """The report as one HTML string."""
    s = summary
    kbox = _boundary_box(s)
    lens = s.get("lens")
    lens_part = "" if not lens else (
        f"<h2>Logit lens: sample {lens.get('sample')}</h2><p>Top {lens.get('top')} tokens of every layer's policy "
        + math_html("under each projection (raw = lm_head(H^k), the paper; final_norm = lm_head(final_norm(H^k)), "
                    "the logit lens; at k = L−1 final_norm is the model's own policy). H in nats.") + "</p>"
        + "<h3>Interactive view</h3>" + lens_grid_html(lens) + "<h3>Table</h3>" + lens_html(lens))
    bd = s.get("boundary") or {}
    rule = math_html(bd.get("rule", ""))
    meta_keys = ["model", "model_type", "dtype", "device", "projection", "delta_convention", "template", "data",
                 "traces", "generation", "position_convention", "num_layers", "vocab_size", "tied_embeddings",
                 "num_samples", "num_tokens", "skipped", "chunk_size", "gemm", "epilogue", "bupo_version", "torch_version",
                 "transformers_version", "created"]
    meta = {key: s[key] for key in meta_keys if key in s}
    figs = "".join(f"<h3>{html.escape(name.replace('_', ' '))}</h3>{img_tag(p)}" for name, p in figures.items())
    final = (f"final policy π<sub>θ</sub>: H = {_fmt(s.get('final_entropy'))} nats, mean log p(next) = "
             f"{_fmt(s.get('final_logprob'), 3)}; embedding H<sup>0</sup>: {_fmt(s.get('embed_entropy'))} nats")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bupo analyze — {html.escape(str(s.get('model', '')))}</title>
<style>{_CSS}</style></head><body>
<h1>Internal policy entropy — {html.escape(str(s.get('model', '')))}</h1>
<p>{s.get('num_samples')} samples, {s.get('num_tokens')} response tokens; projection <code>{html.escape(str(s.get('projection')))}</code>,
ΔH convention <code>{html.escape(str(s.get('delta_convention')))}</code>. Entropies in nats; paper layer l = code layer k + 1.</p>
{kbox}
<p>Boundary rule: {rule}</p>
<p>{final}</p>
<h2>Figures</h2>{figs}
<h2>Per-layer summary</h2>
<p>Means over response tokens; ± is the token-level standard error of the per-token difference.</p>
{_layer_table(s)}
{lens_part}
<h2>Reproduce</h2>
{_kv_table(meta)}
</body></html>
"""


def write_report(summary: Mapping, figures: Mapping[str, Path], path: Path) -> Path:
    """Write ``report.html`` atomically."""
    from bupo.io import atomic_write_text

    return atomic_write_text(path, render_report(summary, figures))
