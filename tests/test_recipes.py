"""Shipped recipes: each is a valid config with a description and a results row; listed, shown, named; shipped."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import tuneforge
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.recipes import config_file, read_recipe, recipe_names, recipe_path, recipes_command, show_command

SRC = Path(tuneforge.__file__).resolve().parents[1]


def test_every_shipped_recipe_is_a_valid_config_with_a_description_and_a_results_row():
    assert "quickstart" in recipe_names()
    for name in recipe_names():
        path = recipe_path(name)
        recipe = read_recipe(path)
        assert recipe.name == name and recipe.description and recipe.results
        config = load_config(path)
        assert (recipe.model, recipe.method) == (config.base_model, config.method)
        assert max(len(line) for line in path.read_text().splitlines()) <= 120, name


def test_the_listing_shows_name_description_model_method_and_results():
    printed = io.StringIO()
    assert recipes_command(Console(file=printed, width=400)) == 0
    recipe = read_recipe(recipe_path("quickstart"))
    for shown in (recipe.name, recipe.description, "smollm2-135m-instruct", "lora", recipe.results):
        assert shown in printed.getvalue()


def test_show_prints_the_recipe_byte_for_byte(capsys):
    assert show_command("quickstart") == 0
    assert capsys.readouterr().out == recipe_path("quickstart").read_text()


def test_an_unknown_recipe_is_an_error_that_lists_the_shipped_ones():
    with pytest.raises(
        ConfigError, match=r"no shipped recipe named 'quickstar' \(did you mean 'quickstart'\?\); there"
    ):
        recipe_path("quickstar")
    with pytest.raises(ConfigError, match=r"no shipped recipe named 'xyz'; there are: .*quickstart") as far:
        recipe_path("xyz")
    assert "did you mean" not in far.value.message
    cli = subprocess.run(
        [sys.executable, "-m", "tuneforge", "recipes", "show", "quickstar"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert cli.returncode == 2 and "no shipped recipe named 'quickstar'" in cli.stderr and not cli.stdout


def test_a_recipe_without_its_header_lines_is_refused_naming_the_file(tmp_path):
    body = recipe_path("quickstart").read_text()
    no_results = tmp_path / "no_results.yaml"
    no_results.write_text("\n".join(line for line in body.splitlines() if not line.startswith("# Results:")))
    with pytest.raises(ConfigError, match=r"no_results.yaml: .*'# Results: \.\.\.' line .*found 0"):
        read_recipe(no_results)
    no_description = tmp_path / "bare.yaml"
    no_description.write_text("method: lora\n" + body)
    with pytest.raises(ConfigError, match=r"bare.yaml line 1: .*one-line description"):
        read_recipe(no_description)


def test_a_config_is_a_file_or_else_a_shipped_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("quickstart") == recipe_path("quickstart")
    Path("quickstart").mkdir()  # a folder of that name is no config file
    assert config_file("quickstart") == recipe_path("quickstart")
    Path("quickstart").rmdir()
    Path("quickstart").write_text("data: {train: t.jsonl}\n")  # a file of that name comes first
    assert config_file("quickstart") == Path("quickstart")
    assert config_file("missing.yaml") == Path("missing.yaml")  # load_config then says it is missing


def test_load_config_and_so_the_python_api_take_a_recipe_name_as_the_cli_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # On a fresh machine, what the recipe builds on is named, with where to learn how to make it.
    with pytest.raises(ConfigError) as fresh:
        load_config("quickstart")
    assert "data.train runs/quickstart/data/train.jsonl" in fresh.value.message
    assert "`tuneforge recipes show quickstart` says what to run first" in fresh.value.message
    data = tmp_path / "runs" / "quickstart" / "data"
    data.mkdir(parents=True)
    for name in ("train.jsonl", "validation.jsonl", "replay.jsonl"):
        (data / name).write_text("")
    cfg = load_config("quickstart", ["train.max_steps=1"])
    assert cfg.output_dir == "runs/quickstart" and cfg.train.max_steps == 1
    # The run's data, in the working folder, held absolute: the run's config.yaml runs from any folder.
    assert cfg.data.train == str((data / "train.jsonl").resolve())
    with pytest.raises(ConfigError, match=r"quickstar \(did you mean 'quickstart'\?\): no such config file, nor "):
        load_config("quickstar")
    # A path names no recipe: nothing is suggested for it.
    with pytest.raises(ConfigError, match=r"no such config file") as path:
        load_config("configs/quickstar.yaml")
    assert "did you mean" not in path.value.message


def test_package_data_ships_every_data_file_and_names_no_missing_one():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tuneforge"]
    package = SRC / "tuneforge"
    shipped = {pattern: set(package.glob(pattern)) for pattern in patterns}  # setuptools globs the same way
    data_files = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data_files - set().union(*shipped.values()) == set()
    assert [pattern for pattern, found in shipped.items() if not found] == []


def test_requires_python_admits_no_python_the_pinned_dependencies_refuse():
    # pip installs tuneforge on any Python its requires-python admits, then fails on a dependency that refuses it
    # ("No matching distribution found for transformers"); a narrow pin (an upper bound or an exact version)
    # keeps the installed version's Requires-Python, so the oldest Python admitted must satisfy each of those.
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    ours = SpecifierSet(project["requires-python"])
    oldest = next(f"3.{minor}" for minor in range(8, 20) if ours.contains(f"3.{minor}"))
    refused = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if not any(spec.operator in ("<", "<=", "==") for spec in requirement.specifier):
            continue
        theirs = metadata(requirement.name).get("Requires-Python") or ""
        if not SpecifierSet(theirs).contains(oldest):
            refused[requirement.name] = theirs
    assert refused == {}, f"requires-python {ours} admits Python {oldest}"
