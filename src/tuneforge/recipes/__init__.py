"""Shipped recipes: complete training configs, as YAML files beside this module, for `tuneforge train`.

A recipe's name is its file name without `.yaml`. Its header comment says what it trains, what it
measured and how to run it; the listing reads two of its lines: the first, a one-line description
(`# ...`), and the one that starts with `# Results:`.

    tuneforge recipes                    # name, description, model, method, results
    tuneforge recipes show quickstart    # the YAML, to read or to save and edit
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ..config import load_config
from ..console import new_console, plain
from ..errors import ConfigError
from ..wording import did_you_mean, nearest

RESULTS_PREFIX = "# Results:"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    model: str
    method: str
    results: str


def recipe_names() -> list[str]:
    folder = resources.files(__name__)
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def nearest_recipe(name: str) -> str | None:
    """The shipped recipe a misspelt name most likely meant, or None when none is close."""
    return nearest(name, recipe_names())


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe `name`; a ConfigError naming the recipes there are otherwise."""
    names = recipe_names()
    if name not in names:
        raise ConfigError(
            f"no shipped recipe named {name!r}{did_you_mean(name, names)}; there are: {', '.join(names)} "
            "(`tuneforge recipes` lists them)"
        )
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))


def config_file(spec: str | Path) -> Path:
    """A config file as given, or, when no such file exists (a folder of that name is none) and `spec` is a
    shipped recipe's name, that recipe's file: what `load_config` takes."""
    path = Path(spec)
    if not path.is_file() and str(spec) in recipe_names():
        return recipe_path(str(spec))
    return path


def check_earlier_outputs(name: str, raw: dict) -> None:
    """A recipe builds on what earlier commands write under runs/ (the quickstart's model and data, a
    student, a teacher's answers): one that is not there yet is refused here, pointing at the recipe's
    header, which says what to run first, before it fails later as a model or data file not found."""
    data, distill = raw.get("data") or {}, raw.get("distill") or {}
    train = data.get("train")
    inputs = [
        ("base_model", raw.get("base_model")),
        ("distill.teacher", distill.get("teacher")),
        *(("data.train", path) for path in (train if isinstance(train, list) else [train])),
        ("data.validation", data.get("validation")),
        ("data.general_replay", data.get("general_replay")),
    ]
    missing = [
        f"{key} {value}"
        for key, value in inputs
        if isinstance(value, str) and value.startswith("runs/") and not Path(value).exists()
    ]
    if missing:
        raise ConfigError(
            f"recipe {name} builds on what earlier commands write, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not here yet "
            f"(paths are relative to the working folder). `tuneforge recipes show {name}` says what to run first."
        )


def load_recipe(name: str) -> dict:
    """The recipe's config as a plain dict, to change before `tuneforge.config.load_config` checks it."""
    return yaml.safe_load(recipe_path(name).read_text(encoding="utf-8"))


def read_recipe(path: Path) -> Recipe:
    """The recipe in `path` with the listing's fields, read from its header comment and its config."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ConfigError(f"{path} line 1: a recipe starts with a one-line description comment ('# what it trains')")
    results = [line.removeprefix(RESULTS_PREFIX).strip() for line in lines if line.startswith(RESULTS_PREFIX)]
    if len(results) != 1:
        raise ConfigError(
            f"{path}: a recipe's header has one '{RESULTS_PREFIX} ...' line with its measured results "
            f"(found {len(results)})"
        )
    config = load_config(path)
    return Recipe(path.stem, path, lines[0].removeprefix("# ").strip(), config.base_model, config.method, results[0])


def recipes_command(console: Console | None = None) -> int:
    """`tuneforge recipes`: a table of the shipped recipes."""
    table = Table(title="Shipped recipes (tuneforge recipes show NAME prints one)")
    for column in ("recipe", "model", "method", "results"):
        table.add_column(column, overflow="fold")
    for recipe in (read_recipe(recipe_path(name)) for name in recipe_names()):
        table.add_row(
            f"[bold]{plain(recipe.name)}[/]\n[dim]{plain(recipe.description)}[/]",
            plain(recipe.model),
            recipe.method,
            plain(recipe.results),
        )
    (console or new_console()).print(table)
    return 0


def show_command(name: str) -> int:
    """`tuneforge recipes show NAME`: the recipe's YAML, byte for byte, on stdout."""
    print(recipe_path(name).read_text(encoding="utf-8"), end="")
    return 0
