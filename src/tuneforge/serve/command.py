"""`tuneforge serve [--model BASE] [--adapter NAME=PATH ...]`: build the pool, the engine and the completion
store, run uvicorn with the request log on stderr."""

from __future__ import annotations

from collections.abc import Sequence

from ..console import new_console, plain
from ..database import shown_url
from ..errors import ConfigError
from ..models.sources import untuned_base_note
from ..serve_defaults import PREFIX_CACHE_MB
from ..web import Observer
from ..web.listen import bind, listen
from ..web.observe import log_requests_to_stderr
from .adapters import load_pool
from .app import create_app
from .bodies import COMPLETIONS_DEFAULT_MAX_TOKENS
from .completion_store import CompletionStore, Retention, default_store
from .engine import Engine


def parse_pairs(specs: Sequence[str], option: str, form: str, example: str) -> dict[str, str]:
    """Repeated `option KEY=VALUE` values into {KEY: VALUE}; a missing side or a key given twice is an error.
    `form` names the two sides (NAME=PATH), `example` is one right value."""
    pairs: dict[str, str] = {}
    for spec in specs:
        key, sep, value = (part.strip() for part in spec.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"{option} {spec}: expected {form}, e.g. {option} {example}", code="invalid_value")
        if key in pairs:
            raise ConfigError(f"{option} {key} is given twice; give each key once.", code="invalid_value")
        pairs[key] = value
    return pairs


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` pairs into {name: path}."""
    return parse_pairs(specs, "--adapter", "NAME=PATH", "triage=runs/triage")


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
    store: str | None = None,
    retention: Retention = Retention(),
    log_prompts: bool = False,
    allow_adapter_updates: bool = False,
    prefix_cache_mb: int = PREFIX_CACHE_MB,
) -> int:
    sock = bind(host, port)
    completions = CompletionStore.open(store or default_store(), retention)
    pool = load_pool(model, parse_adapters(adapter_specs), max_loaded=max_adapters, precision=precision)
    engine = Engine(pool, max_batch=max_batch, max_waiting=max_waiting, prefix_cache_mb=prefix_cache_mb)
    try:
        app = create_app(
            engine,
            api_keys=api_keys,
            default_max_tokens=default_max_tokens,
            max_body_bytes=max_body_mb << 20,
            docs=docs,
            observer=Observer(log_prompts=log_prompts),
            completions=completions,
            adapter_updates=allow_adapter_updates,
        )
        if note := untuned_base_note(pool.base_source):
            new_console(stderr=True).print(f"[yellow]note:[/] {plain(note)}", highlight=False, soft_wrap=True)
        log_requests_to_stderr()
        dtype = str(pool.model.dtype).removeprefix("torch.")
        limits = served_limits(
            engine.max_batch, engine.max_waiting, default_max_tokens, max_body_mb, context_room(app.state.served.window)
        )
        listen(
            app,
            sock,
            lambda url: f"serving [bold]{plain(pool.base_name)}[/] on {pool.model.device} in {dtype}"
            + (f" with adapters {plain(', '.join(pool.names[1:]))}" if len(pool.names) > 1 else "")
            + f" at {url}/v1"
            + (" (API key required)" if api_keys else "")
            + (
                "; adapters load and unload at /v1/load_lora_adapter and /v1/unload_lora_adapter"
                if allow_adapter_updates
                else ""
            )
            + f"; {prefix_cache_note(prefix_cache_mb)}"
            + f"; stored completions in {plain(shown_url(completions.url))}; {limits}",
        )
    finally:
        engine.close()
    return 0


def prefix_cache_note(prefix_cache_mb: int) -> str:
    """The prefix cache's size (`--prefix-cache-mb`), for the startup line."""
    return f"prefix cache up to {prefix_cache_mb} MiB" if prefix_cache_mb else "prefix cache off"


def context_room(window: int | None) -> str:
    """Where a prompt and its reply must fit, for `served_limits`: the model's context window."""
    return f"within the {window}-token context window" if window else "no context window in the model's config"


def served_limits(max_batch: int, max_waiting: int, default_max_tokens: int, max_body_mb: int, room: str) -> str:
    """The limits an operator sizes a deployment by, for the startup line: batch, queue, reply length, context
    window (`room`), body size; a request has no time limit (a client that hangs up stops its own)."""
    return (
        f"limits: {max_batch} rows decoded at once, {max_waiting} waiting (then 429), "
        f"max_tokens {default_max_tokens} by default for chat and {COMPLETIONS_DEFAULT_MAX_TOKENS} for completions, "
        f"prompt and reply {room}, bodies up to {max_body_mb} MiB, no request timeout"
    )
