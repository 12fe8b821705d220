"""Serve an app on a socket bound before its address is announced.

The socket is bound here, before uvicorn starts, so the address a server prints is the one that
answers, and `--port 0` takes a port the OS picks: whoever reads the printed address (a script, a
test, a supervisor) never has to pick a free port itself and race other processes for it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from ..console import new_console, plain
from ..errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: one the OS picks), taken before the slow part of a
    command (loading a model) so a port in use fails at once."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({error.strerror}). Give another --port (0 lets the OS pick a free one "
            "and prints it), or stop the process that holds this one."
        ) from None


def listen(app, sock: socket.socket, announce: Callable[[str], str], log_level: str = "info") -> None:
    """Run `app` under uvicorn on `sock` (from `bind`) until SIGINT or SIGTERM; `announce(url)` (the
    url without a trailing slash, with the port actually bound, already `plain`: an IPv6 host's brackets
    are no tag) is printed to stderr first, on one line whatever its length, for scripts to read; it is
    markup, each value of the user's in it `plain`."""
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    new_console(stderr=True).print(announce(plain(f"http://{shown_host}:{port}")), highlight=False, soft_wrap=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
