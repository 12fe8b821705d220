"""`tuneforge serve [--model BASE] [--adapter NAME=PATH ...]`: build the pool and the engine, run uvicorn."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console

from ..errors import ConfigError
from .adapters import AdapterPool
from .app import create_app
from .engine import Engine


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` pairs into {name: path}; a name given twice is an error."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(
                f"--adapter {spec}: expected NAME=PATH, e.g. --adapter triage=runs/triage", code="invalid_value"
            )
        if name.strip() in adapters:
            raise ConfigError(
                f"--adapter {name.strip()} is given twice; each adapter needs its own name.", code="invalid_value"
            )
        adapters[name.strip()] = path.strip()
    return adapters


def serve_command(
    model: str | None,
    adapter_specs: Sequence[str],
    *,
    host: str,
    port: int,
    api_keys: Sequence[str],
    max_adapters: int,
    max_batch: int,
    max_waiting: int,
    default_max_tokens: int,
    max_body_mb: int,
    docs: bool,
    precision: str = "auto",
) -> int:
    import uvicorn

    pool = AdapterPool(model, parse_adapters(adapter_specs), max_loaded=max_adapters, precision=precision)
    engine = Engine(pool, max_batch=max_batch, max_waiting=max_waiting)
    try:
        app = create_app(
            engine,
            api_keys=api_keys,
            default_max_tokens=default_max_tokens,
            max_body_bytes=max_body_mb << 20,
            docs=docs,
        )
        console = Console(stderr=True)
        console.print(
            f"serving [bold]{pool.base_name}[/] on {pool.model.device} in {pool.model.dtype}"
            + (f" with adapters {', '.join(pool.names[1:])}" if len(pool.names) > 1 else "")
            + f" at http://{host}:{port}/v1"
            + (" (API key required)" if api_keys else ""),
            highlight=False,
        )
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
    return 0
