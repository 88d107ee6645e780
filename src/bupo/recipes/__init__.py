"""The shipped presets: the paper's training runs (``*.yaml``) and accelerate configs (``accelerate/*.yaml``).

They ship inside the package, so ``bupo train --config qwen3-4b`` works from an installed wheel in any folder;
``bupo recipes`` lists them, ``bupo recipes show NAME`` prints one and ``bupo recipes path NAME`` prints its file
(for ``accelerate launch --config_file "$(bupo recipes path zero3)" ...``, as accelerate only takes paths).

A preset's data (``data:``, ``eval_data:``) are the paper's sets by name (``deepmath-5k``; ``aime24``, ``aime25``,
``amc23``, ``math500``), which ship with the package (``bupo.data.datasets.data_path``); ``--data`` / ``--eval_data``
take other files.

This module imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RECIPES_DIR", "Recipe", "list_recipes", "recipe_path", "resolve_config"]

RECIPES_DIR = Path(__file__).resolve().parent
_ACCELERATE = "accelerate"


@dataclass(frozen=True)
class Recipe:
    """One shipped preset. ``kind`` is ``train`` (a ``bupo train --config``) or ``accelerate`` (``--config_file``)."""

    name: str
    kind: str
    path: Path
    model: str | None
    description: str


def _describe(path: Path) -> tuple[str | None, str]:
    """(model_name_or_path, the first comment line) read without a YAML parser: keeps ``bupo recipes`` instant."""
    model, description = None, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not description and line.startswith("#"):
            description = line.lstrip("#").strip()
            # the presets' first line ends with the same boilerplate; the list is clearer without it
            description = description.removesuffix(", in TRL 1.16 terms.").split(". ", 1)[0].rstrip(".:")
        if line.startswith("model_name_or_path:"):
            model = line.split(":", 1)[1].split("#", 1)[0].strip() or None
    return model, description


def list_recipes() -> list[Recipe]:
    """Every shipped preset: the training presets first, then the accelerate configs, each sorted by name."""
    out = []
    for kind, folder in (("train", RECIPES_DIR), (_ACCELERATE, RECIPES_DIR / _ACCELERATE)):
        for path in sorted(folder.glob("*.yaml")):
            model, description = _describe(path)
            out.append(Recipe(path.stem, kind, path, model, description))
    return out


def recipe_path(name: str) -> Path:
    """The file of the shipped preset ``name`` (``qwen3-4b``, ``zero3``; ``accelerate/zero3`` and a ``.yaml``
    suffix are accepted too). Raises ``ValueError`` naming the known presets."""
    stem = name.strip().removesuffix(".yaml").removesuffix(".yml")
    stem = stem.removeprefix("recipes/")  # the spelling of the source tree's old recipes/ folder
    kind = None
    if stem.startswith(f"{_ACCELERATE}/"):
        kind, stem = _ACCELERATE, stem.split("/", 1)[1]
    for recipe in list_recipes():
        if recipe.name == stem and kind in (None, recipe.kind):
            return recipe.path
    known = ", ".join(r.name for r in list_recipes())
    raise ValueError(f"no shipped recipe named {name!r}; known: {known} (or pass the path of a YAML file)")


def resolve_config(value: str) -> Path:
    """``--config VALUE``: an existing file is taken as it is, otherwise ``VALUE`` names a shipped preset."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    try:
        return recipe_path(value)
    except ValueError as exc:
        if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:  # meant as a path: say the file is missing
            known = ", ".join(r.name for r in list_recipes() if r.kind == "train")
            raise FileNotFoundError(f"config file not found: {p} (nor is it a shipped preset: {known})") from None
        raise exc
