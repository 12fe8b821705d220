"""`tuneforge ui [DIR]`: DIR and the port are checked before the dashboard's modules (torch, transformers,
FastAPI) load, so a mistyped folder or a port in use is refused at once rather than after a long import."""

from __future__ import annotations

from pathlib import Path

from ..console import plain
from ..errors import ConfigError


def ui_command(directory: Path, *, host: str, port: int, max_models: int) -> int:
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a folder: give the folder your run folders are in (e.g. runs).")
    from ..web.listen import bind, listen

    sock = bind(host, port)
    from .app import PREFIX, create_ui_app

    app = create_ui_app(directory, max_models=max_models)
    listen(
        app, sock, lambda url: f"tuneforge ui: the runs under {plain(directory.resolve())} at {url}{PREFIX}/", "warning"
    )
    return 0
