"""The shipped presets: listed, shown, resolved by name from any folder, and packaged into the wheel (with the paper's
data they name)."""

import subprocess
import sys
from pathlib import Path

import pytest

from bupo.cli import main
from bupo.recipes import RECIPES_DIR, list_recipes, recipe_path, resolve_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_yaml_is_listed_with_its_model_and_purpose():
    files = sorted(RECIPES_DIR.rglob("*.yaml"))
    recipes = list_recipes()
    assert sorted(r.path for r in recipes) == files and len(files) >= 8
    train = {r.name: r for r in recipes if r.kind == "train"}
    assert set(train) == {"qwen3-4b", "qwen3-8b", "octothinker-3b", "octothinker-8b"}
    assert train["qwen3-4b"].model == "Qwen/Qwen3-4B" and "Table 1" in train["qwen3-4b"].description
    assert {r.name for r in recipes if r.kind == "accelerate"} == {"cpu", "ddp", "fsdp2", "fsdp2-cpu", "zero3"}
    assert all(r.description for r in recipes)


def test_cli_lists_shows_and_prints_paths(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-4b" in out and "Qwen/Qwen3-4B" in out and "zero3" in out and "--config NAME" in out
    assert main(["recipes", "show", "qwen3-8b"]) == 0
    out = capsys.readouterr().out
    assert "model_name_or_path: Qwen/Qwen3-8B" in out
    assert main(["recipes", "path", "zero3"]) == 0
    assert Path(capsys.readouterr().out.strip()) == RECIPES_DIR / "accelerate" / "zero3.yaml"
    assert main(["recipes", "show", "qwen9"]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe named 'qwen9'" in err and "qwen3-4b" in err and "Traceback" not in err


@pytest.mark.parametrize("spelling", ["qwen3-4b", "qwen3-4b.yaml", "recipes/qwen3-4b.yaml"])
def test_names_and_the_old_source_tree_spelling_resolve(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(spelling) == RECIPES_DIR / "qwen3-4b.yaml"
    assert recipe_path("accelerate/zero3") == recipe_path("zero3")


def test_a_file_wins_over_a_name_and_a_missing_path_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen3-4b").write_text("internal_layer: 2\n")
    assert resolve_config("qwen3-4b") == Path("qwen3-4b")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        resolve_config("configs/mine.yaml")


def test_train_config_takes_a_name_from_another_folder(tmp_path, monkeypatch):
    from bupo.training.arguments import parse_train_args

    monkeypatch.chdir(tmp_path)
    args, script = parse_train_args([], config="octothinker-3b", cuda=False)
    assert script.model_name_or_path == "OctoThinker/OctoThinker-3B-Long-Base" and args.internal_steps > 0


def test_the_wheel_ships_every_recipe(tmp_path):
    """Build the wheel (no deps, no isolation: setuptools is in the venv) and look inside it."""
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("bupo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in RECIPES_DIR.rglob("*.yaml"):
        assert f"bupo/recipes/{path.relative_to(RECIPES_DIR).as_posix()}" in names
    assert "bupo/recipes/cli.py" in names
    from bupo.data.datasets import PAPER_DATA  # the paper's sets, taken by name, ship too

    assert {f"bupo/data/paper/{f}" for f in PAPER_DATA.values()} | {"bupo/data/paper/README.md"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
