"""The python grader's child process: runs a user's `grade(sample, item)` over one batch, or a
TRL-style reward function once for the whole batch.

    python -I python_child.py < {"source": ..., "samples": [...], "items": [...], "memory_bytes": N}
    python -I python_child.py < {"source": ..., "filename": ..., "function": NAME, "prompts": [...],
                                 "completions": [...], "columns": {...}, "memory_bytes": N}

It is run as a script, never imported, with the standard library alone. It reads its request as
JSON on stdin and writes one JSON line per sample to the stdout it was started with: {"score": x},
or {"returned": "<repr>"} for a result that is not a number, or at the first exception (in
grade(), or turning its result into a float) {"error": ..., "traceback": ..., "memory": bool} and
nothing more. A reward function's rewards come as the same lines, one per completion ({"score": null}
for a None); a call that raises, or returns anything but a list of one reward per completion, is
an error line for the first sample, marked {"batch": true}. Before the user's code runs it
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
SHOWN_CHARS = 500  # of an exception's message and of each traceback line, so one error is a few KiB at most


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


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _failure(error: BaseException, what: str, filename: str = GRADER_FILE) -> dict:
    # Only the frames of the user's code: the others are this script's or the library's, and would show server paths.
    # An error raised before the user's code ran (a call with arguments it does not take) has none, and no traceback.
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == filename]
    formatted = traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    lines = "".join(["Traceback (most recent call last):\n", *formatted]).rstrip().splitlines() if frames else []
    return {
        "error": f"{what} {type(error).__name__}" + (f": {_cut(str(error))}" if str(error) else ""),
        "traceback": "\n".join(_cut(line) for line in lines[-TRACEBACK_LINES:]),
        "memory": isinstance(error, MemoryError),
    }


def _shown(value) -> str:
    """`value` as a reply names a result that is not a number: its repr, cut short, and its type."""
    try:
        return f"{value!r:.100} ({type(value).__name__})"
    except BaseException:  # nested past the recursion limit, or a __repr__ of the user's that raises
        return f"a value ({type(value).__name__}) whose repr() fails"


def main() -> None:
    request = json.load(sys.stdin.buffer)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    source, filename = request["source"], request.get("filename", GRADER_FILE)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _limit(request["memory_bytes"])
    namespace = {"__name__": "grader"}
    function = request.get("function", "grade")
    try:
        exec(compile(source, filename, "exec"), namespace)
        grade = namespace[function]
    except BaseException as error:
        reply(_failure(error, "loading the source raised", filename))
        return
    if "function" in request:
        _reward_function(grade, function, request, filename, reply)
        return
    for sample, item in zip(request["samples"], request["items"]):
        try:
            value = grade(sample, item)
        except BaseException as error:
            reply(_failure(error, "grade() raised"))
            return
        if not isinstance(value, numbers.Real):
            reply({"returned": _shown(value)})
            continue
        try:
            score = float(value)
        except BaseException as error:  # an int past a float's range, or a number type's own __float__ failing
            reply(_failure(error, "grade() returned a number that float() refuses:"))
            return
        reply({"score": score})


def _reward_function(function, name: str, request: dict, filename: str, reply) -> None:
    """One call of a TRL-style reward function for the whole batch, its rewards replied one a line."""
    completions = request["completions"]
    try:
        values = function(prompts=request["prompts"], completions=completions, **request["columns"])
    except BaseException as error:
        failure = {**_failure(error, f"{name}() raised", filename), "batch": True}
        if isinstance(error, TypeError) and error.__traceback__.tb_next is None:  # the call itself: its arguments
            columns = ", ".join(request["columns"]) or "none"
            failure["error"] += f" (it is given prompts, completions and, by name, the data's columns: {columns})"
        reply(failure)
        return
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"a list of {len(values)}" if isinstance(values, (list, tuple)) else _shown(values)
        reply(
            {
                "error": f"{name}() returned {got}, not a list of {len(completions)} rewards (one per completion)",
                "traceback": "",
                "memory": False,
                "batch": True,
            }
        )
        return
    for value in values:
        if value is None:
            reply({"score": None})
            continue
        if not isinstance(value, numbers.Real):
            reply({"returned": _shown(value)})
            continue
        try:
            reply({"score": float(value)})
        except BaseException as error:
            reply(_failure(error, f"{name}() returned a number that float() refuses:", filename))
            return


if __name__ == "__main__":
    main()
    # Ends here, not at the interpreter's exit, which would wait for threads the user's code left running.
    sys.stderr.flush()
    os._exit(0)
