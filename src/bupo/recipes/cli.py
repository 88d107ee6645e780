"""``bupo recipes``: the shipped presets.

- ``bupo recipes``: list them (name, model, what it reproduces);
- ``bupo recipes show NAME``: print one;
- ``bupo recipes path NAME``: print its file, e.g. for ``accelerate launch --config_file "$(bupo recipes path zero3)"``.

Only the standard library is imported.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipes", help="the shipped presets: paper runs for bupo train --config NAME, accelerate configs",
        description="The shipped presets. `bupo train --config NAME` takes a training preset by name; "
                    "accelerate takes a path: --config_file \"$(bupo recipes path zero3)\".")
    sub = p.add_subparsers(dest="recipes_command", metavar="RECIPES_COMMAND")
    ls = sub.add_parser("list", help="list the presets (the default)")
    ls.set_defaults(func=_list)
    show = sub.add_parser("show", help="print one preset")
    show.add_argument("name", help="a preset name from `bupo recipes` (qwen3-4b, zero3, ...)")
    show.set_defaults(func=_show)
    path = sub.add_parser("path", help="print the file of one preset")
    path.add_argument("name", help="a preset name from `bupo recipes` (qwen3-4b, zero3, ...)")
    path.set_defaults(func=_path)
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from bupo.recipes import list_recipes

    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    mwidth = max(len(r.model or "-") for r in recipes)
    print("training presets: bupo train --config NAME (a copy you edit: bupo recipes show NAME > my.yaml)")
    print(f"  {'NAME':<{width}}  {'MODEL':<{mwidth}}  REPRODUCES")
    for r in (r for r in recipes if r.kind == "train"):
        print(f"  {r.name:<{width}}  {r.model or '-':<{mwidth}}  {r.description}")
    print('accelerate configs: accelerate launch --config_file "$(bupo recipes path NAME)" -m bupo.cli train ...')
    for r in (r for r in recipes if r.kind == "accelerate"):
        print(f"  {r.name:<{width}}  {r.description}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from bupo.recipes import recipe_path

    path = recipe_path(args.name)
    print(f"# {path}")
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def _path(args: argparse.Namespace) -> int:
    from bupo.recipes import recipe_path

    print(recipe_path(args.name))
    return 0
