"""``bupo train``: BuPO (or GRPO) on TRL's GRPOTrainer. Standard library only at import time."""

from __future__ import annotations

import argparse
import sys

from bupo.cli_common import TEMPLATE_CHOICES, TEMPLATE_HELP, BupoArgumentParser, alias_other_spellings
from bupo.rewards.api import REWARD_NAMES

DESCRIPTION = """\
Bottom-up Policy Optimization (arXiv 2512.19673) on TRL's GRPOTrainer: the first S rollout steps optimise the
layer-k internal policy (0-based k, paper layer k+1), then GRPO on the full policy. Without arguments: the bundled
tiny model on the bundled task, a few minutes on 2 CPU cores, with evaluation before and after.

Any TRL/GRPOConfig argument can be added as is (underscores, as TRL writes them; dashes work too), e.g.
--learning_rate 1e-5 --max_steps 20 --num_generations 8 --use_vllm true; they override --config. The BuPOConfig
fields, bupo train keys and common TRL fields with their defaults are listed after the options below (every TRL field:
--help-all). Presets for the paper's runs: `bupo recipes` (--config NAME or a path). Shared flags: docs/cli.md."""

EPILOG = """\
examples:
  bupo train                                         # bundled model + task, BuPO with k from the analysis
  bupo train --algo grpo --out runs/grpo             # the GRPO baseline, same settings
  bupo train --internal-layer 3 --internal-steps 10 --max_steps 60
  bupo train --config qwen3-4b --model /models/Qwen3-4B --data deepmath-5k
  accelerate launch --config_file "$(bupo recipes path zero3)" -m bupo.cli train --config qwen3-8b
  bupo train --out runs/x --resume                   # continue from the newest checkpoint (right phase)
presets: bupo recipes; the full guide: docs/training.md in the bupo source tree"""


def _steps(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 or 'auto', got {text!r}") from None


class _PassThroughParser(BupoArgumentParser):
    """Keeps unknown arguments (TRL's own flags) in ``args.trl_args`` instead of failing on them; its help lists the
    BuPOConfig fields and bupo train keys with their defaults (:mod:`bupo.training.help`, imported on --help only)."""

    keep_spellings = True  # --internal_layer etc. are TRL fields: TRL's parser takes both spellings of them
    help_all = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, rest = super().parse_known_args(args, namespace)
        ns.trl_args = list(getattr(ns, "trl_args", None) or []) + list(rest)
        return ns, []

    def format_help(self) -> str:
        from bupo.training.help import config_help

        return super().format_help() + config_help(everything=self.help_all)


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        parser.help_all = True
        parser.print_help()
        sys.exit(0)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train with BuPO or GRPO (TRL GRPOTrainer)", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    p.__class__ = _PassThroughParser
    p.add_argument("--help-all", action=_HelpAll, help="show this help with every GRPOConfig / ModelConfig field and exit")
    p.add_argument("--model", help="a bupo name (`bupo model list`), a local folder or a Hub id (default: tiny, the bundled model)")
    p.add_argument("--data", help="training rows: deepmath-5k (the paper's, packaged), .parquet / .jsonl (paper "
                   "shape) or 'bundled' (default)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE",
                   help="held-out sets evaluated during training: aime24 aime25 amc23 math500, files, 'bundled' "
                   "(bundled test split) or 'none' (off)")
    p.add_argument("--algo", choices=("bupo", "grpo"), help="bupo (default) or grpo (internal_steps = 0)")
    p.add_argument("--internal-layer", metavar="K|auto",
                   help="0-based layer k (paper layer k+1) or 'auto' = the analysis' boundary layer (default auto)")
    p.add_argument("--internal-steps", type=_steps, metavar="S|auto",
                   help="s_inter: rollout steps on the internal policy, or 'auto' (adaptive switch, needs "
                   "--internal-steps-max)")
    p.add_argument("--internal-steps-max", type=int, metavar="N",
                   help="with --internal-steps auto: at most N internal rollout steps")
    p.add_argument("--internal-schedule", metavar="K1:S1,K2:S2",
                   help="progressive: layer K1 (0-based) for S1 rollout steps, then K2 for S2, then the full policy")
    p.add_argument("--out", help="output folder (checkpoints, final model, bupo_run.json)")
    p.add_argument("--config", help="a shipped preset's name (bupo recipes) or a TRL-style YAML of "
                                         "BuPOConfig/GRPOConfig fields and bupo train keys")
    p.add_argument("--template", metavar="{" + ",".join(TEMPLATE_CHOICES) + "}",  # checked as the YAML key is
                   help=TEMPLATE_HELP)
    p.add_argument("--train-limit", "--train_rows", "--train-rows", dest="train_limit", type=int, metavar="N",
                   help="use at most N training rows (default: all; the bundled task generates 2048)")
    p.add_argument("--eval-limit", "--eval_rows", "--eval-rows", dest="eval_limit", type=int, metavar="N",
                   help="at most N problems per --eval-data file (default: all; 100 without --config)")
    p.add_argument("--reward", help=f"comma-separated, summed: {', '.join(REWARD_NAMES)} (default boxed_exact, "
                                    "the paper's)")
    p.add_argument("--analysis", help="analysis (summary.json or folder) for --internal-layer auto")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="resume from a checkpoint folder, or the newest complete one in --out when no folder is given")
    p.add_argument("--force-resume", action="store_true", default=None,
                   help="resume even when the layer, internal steps, projection, optimizer steps per rollout, model "
                   "or data differ from the checkpoint's run (refused otherwise)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out (model, checkpoints, evaluations); with --resume "
                   "CHECKPOINT, discard the checkpoints newer than it (refused otherwise)")
    p.add_argument("--verbose", action="store_true", default=None,
                   help="print TRL's raw log dicts instead of bupo's progress bar (switch and end lines stay), and keep "
                   "the libraries' own progress bars and warnings (also BUPO_VERBOSE=1)")
    # the other spelling of a flag above is a TRL field (TRL's parser takes both) except for these bupo-only ones
    alias_other_spellings(p, [a for a in p._actions if a.dest in ("help_all", "train_limit", "eval_limit")])
    p.set_defaults(func=_handler, trl_args=[])


def _handler(args: argparse.Namespace) -> int:
    from bupo.training.run import run_cli

    return run_cli(args)
