"""``bupo model``: the bundled tiny reasoning model.

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
    p = subparsers.add_parser("model", help="the bundled tiny reasoning model (info, build, grpo-proof)")
    sub = p.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")

    info = sub.add_parser("info", help="print the bundled model's card")
    info.add_argument("--json", action="store_true", help="print the recipe record (recipe.json) instead")
    info.set_defaults(func=_info)

    path = sub.add_parser("path", help="print the bundled model's folder")
    path.set_defaults(func=_path)

    build = sub.add_parser("build", help="rebuild the bundled model from scratch (the recipe)")
    build.add_argument(
        "--out", default="runs/tiny_reasoner", help="output folder (default: runs/tiny_reasoner)"
    )
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
    record = build(args.out, cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(
        json.dumps({"out": args.out, **{k: record[k] for k in ("train", "eval_heldout_t1", "total_seconds")}})
    )
    return 0


def _proof(args: argparse.Namespace) -> int:
    from bupo.zoo.grpo_proof import run_from_args

    result = run_from_args(args)
    print(json.dumps(result, indent=2))
    return 0
