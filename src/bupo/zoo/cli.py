"""``bupo model``: models by name (list, get, import-gguf) and the bundled tiny reasoning model.

- ``bupo model list [--json]``: every bupo model name with family, layers, vocabulary, licence, ready?;
- ``bupo model get NAME``: prepare a name (convert its GGUF into the cache once); the last line is its folder;
- ``bupo model import-gguf FILE --out DIR``: convert any GGUF into a Hugging Face safetensors folder;
- ``bupo model info [--json]``: print the model card (recipe, seed, data, measured accuracy);
- ``bupo model path``: print the folder (the default ``--model`` of every other command);
- ``bupo model build [--out DIR] [--seed S] [--smoke] [--threads N]``: run the recipe from scratch;
- ``bupo model grpo-proof [--model DIR] [--out FILE] ...``: the GRPO run that shows RL improves it.

Only the standard library is imported at top level.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model", help="models by name (list, get, import-gguf) and the bundled tiny model (info, build, grpo-proof)"
    )
    sub = p.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")

    lst = sub.add_parser("list", help="bupo model names: family, layers, vocabulary, licence, ready?")
    lst.add_argument("--json", action="store_true", help="print the table as JSON")
    lst.set_defaults(func=_list)

    get = sub.add_parser("get", help="prepare a named model (GGUF -> cache, once); prints its folder last")
    get.add_argument("name", help="a bupo model name (see `bupo model list`)")
    get.set_defaults(func=_get)

    imp = sub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face safetensors folder")
    imp.add_argument("file", help="the .gguf file")
    imp.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    imp.set_defaults(func=_import_gguf)

    info = sub.add_parser("info", help="print the bundled model's card")
    info.add_argument("--json", action="store_true", help="print the recipe record (recipe.json) instead")
    info.set_defaults(func=_info)

    path = sub.add_parser("path", help="print the bundled model's folder")
    path.set_defaults(func=_path)

    build = sub.add_parser("build", help="rebuild the bundled model from scratch (the recipe)")
    build.add_argument(
        "--out", default="runs/tiny_reasoner", help="output folder (default: runs/tiny_reasoner)"
    )
    build.add_argument("--overwrite", action="store_true",
                       help="replace --out when it holds an earlier build (never any other folder)")
    build.add_argument("--seed", type=int, default=0, help="recipe seed (default: 0, the shipped model)")
    build.add_argument("--smoke", action="store_true", help="a few steps only (checks the recipe runs)")
    build.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    build.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default: 1, as the shipped build)"
    )
    build.set_defaults(func=_build)

    proof = sub.add_parser("grpo-proof", help="GRPO on the bundled task; held-out pass@1 before/after")
    from bupo.zoo.grpo_proof import add_arguments  # stdlib-only at top level

    add_arguments(proof)
    proof.set_defaults(func=_proof)

    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _list(args: argparse.Namespace) -> int:
    from bupo.models import cache_root, model_table

    rows = model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("name", "family", "layers", "vocab", "licence", "ready")
    cells = [[str(r[c]).lower() if c == "ready" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r, row in zip(rows, cells, strict=True):
        note = "" if r["ready"] or r["installed"] else f"  (needs: {r['install']})"
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + note)
    print(f"cache: {cache_root()} (set BUPO_CACHE to move it); `bupo model get NAME` prepares a name")
    return 0


def _get(args: argparse.Namespace) -> int:
    from bupo.models import prepare_model

    print(prepare_model(args.name))  # unknown names and missing packages: one-line ValueError
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from bupo.models import import_gguf

    record = import_gguf(args.file, args.out)
    print(json.dumps({k: record[k] for k in ("architecture", "layers", "vocab", "chat_template")}))
    print(args.out)
    return 0


def _info(args: argparse.Namespace) -> int:
    from bupo.zoo import bundled_model_path, model_card

    if args.json:
        print((bundled_model_path() / "recipe.json").read_text(encoding="utf-8"))
    else:
        print(model_card())
    return 0


def _path(args: argparse.Namespace) -> int:
    from bupo.zoo import bundled_model_path

    print(bundled_model_path())
    return 0


def _build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bupo.zoo.recipe import RecipeConfig, build

    cfg = RecipeConfig.smoke_config(seed=args.seed) if args.smoke else RecipeConfig(seed=args.seed)
    # replace() re-runs RecipeConfig's checks (--threads, --steps >= 1) on the overridden values
    overrides = {"threads": args.threads} | ({} if args.steps is None else {"steps": args.steps})
    cfg = replace(cfg, **overrides)
    record = build(args.out, cfg, log=lambda s: print(s, file=sys.stderr, flush=True), overwrite=args.overwrite)
    print(
        json.dumps({"out": args.out, **{k: record[k] for k in ("train", "eval_heldout_t1", "total_seconds")}})
    )
    return 0


def _proof(args: argparse.Namespace) -> int:
    from bupo.zoo.grpo_proof import run_from_args

    result = run_from_args(args)
    print(json.dumps(result, indent=2))
    return 0
