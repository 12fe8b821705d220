"""The python grader's child process: runs a user's `grade(sample, item)` over one batch.

    python -I python_child.py < {"source": ..., "samples": [...], "items": [...], "memory_bytes": N}

It is run as a script, never imported, with the standard library alone. It reads its request as
JSON on stdin and writes one JSON line per sample to the stdout it was started with: {"score": x},
or {"returned": "<repr>"} for a result that is not a number, or at the first exception (in
grade(), or turning its result into a float) {"error": ..., "traceback": ..., "memory": bool} and
nothing more. Before the user's code runs it
caps the address space (RLIMIT_AS, Linux), makes new sockets raise, and points fd 1 and
sys.stdout at stderr so that the user's prints cannot break those lines. This is best effort,
not a sandbox: code that means harm can undo any of it.
"""

from __future__ import annotations

import json
import linecache
import numbers
import os
import resource
import socket
import sys
import traceback

GRADER_FILE = "<grader>"
TRACEBACK_LINES = 12


class _NoNetworkSocket(socket.socket):
    # A subclass rather than a function, so modules that subclass socket.socket (ssl) still import.
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in python graders")


def _refuse_connection(*args, **kwargs):
    raise PermissionError("network access is disabled in python graders")


def _limit(memory_bytes: int) -> None:
    if sys.platform.startswith("linux"):
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    socket.socket = _NoNetworkSocket
    socket.create_connection = _refuse_connection


def _failure(error: BaseException, what: str) -> dict:
    # Only the frames of the user's code: the others are this script's or the library's, and would show server paths.
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == GRADER_FILE]
    formatted = traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    lines = "".join(["Traceback (most recent call last):\n", *formatted]).rstrip().splitlines()
    return {
        "error": f"{what} {type(error).__name__}" + (f": {error}" if str(error) else ""),
        "traceback": "\n".join(lines[-TRACEBACK_LINES:]),
        "memory": isinstance(error, MemoryError),
    }


def main() -> None:
    request = json.load(sys.stdin.buffer)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    source = request["source"]
    linecache.cache[GRADER_FILE] = (len(source), None, source.splitlines(True), GRADER_FILE)
    _limit(request["memory_bytes"])
    namespace = {"__name__": "grader"}
    try:
        exec(compile(source, GRADER_FILE, "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as error:
        reply(_failure(error, "loading the source raised"))
        return
    for sample, item in zip(request["samples"], request["items"]):
        try:
            value = grade(sample, item)
        except BaseException as error:
            reply(_failure(error, "grade() raised"))
            return
        if not isinstance(value, numbers.Real):
            reply({"returned": f"{value!r:.100} ({type(value).__name__})"})
            continue
        try:
            score = float(value)
        except BaseException as error:  # an int past a float's range, or a number type's own __float__ failing
            reply(_failure(error, "grade() returned a number that float() refuses:"))
            return
        reply({"score": score})


if __name__ == "__main__":
    main()
