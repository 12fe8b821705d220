"""Step-level interleaving of benchmark candidates, so a noisy shared machine treats them alike.

Every candidate runs in its own process (so its peak RSS is its own), and all of them are started
at once; but only one of them computes at a time. The parent hands out turns round-robin: a turn is
one optimizer step of one candidate (or one matmul probe). A step's time is measured from the
moment its turn is granted to the moment the step has ended, so it includes everything the
trainer does between two steps (fetching and collating the batch, forward, backward, clipping,
optimizer, logging), and none of the other candidates' work. Load from other users of the machine
comes and goes over minutes; with turns a few seconds long, every candidate samples the same load.

Protocol, one JSON object per line over two pipes (fds in $TF_BENCH_TURN_FDS = "go_fd,done_fd"):
child -> parent: {"event": "ready"} once set up; {"event": "step", ...} after each step (with
"last": true after the last one); {"event": "result", ...} when finished. Parent -> child: "go".
After "ready" and after each "step" the child blocks until it gets "go".

While a candidate waits for its turn it hands freed heap memory back to the OS (`malloc_trim`), so
that several idle candidates do not hold their peak memory at once. Every candidate does this
identically; the cost (pages faulted in again in the next step) is inside the timed step for all.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

ENV = "TF_BENCH_TURN_FDS"

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _libc = None


def trim_heap() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


class Turns:
    """The child's side. Without $TF_BENCH_TURN_FDS (run by hand) every turn is granted at once."""

    def __init__(self):
        fds = os.environ.get(ENV)
        if fds:
            go, done = (int(x) for x in fds.split(","))
            self._go = os.fdopen(go, "r", buffering=1)
            self._done = os.fdopen(done, "w", buffering=1)
        else:
            self._go = self._done = None
        self.granted_at = time.perf_counter()

    def send(self, event: str, **payload) -> None:
        if self._done is not None:
            self._done.write(json.dumps({"event": event, **payload}) + "\n")
            self._done.flush()

    def wait(self) -> str:
        """Block until the parent grants the next turn ("go"; the turn's clock starts then) or asks an
        open-ended participant (a probe) to finish ("stop")."""
        command = "go"
        if self._go is not None:
            trim_heap()
            command = self._go.readline().strip()
            if not command:
                sys.exit("bench parent went away")
        self.granted_at = time.perf_counter()
        return command

    def elapsed(self) -> float:
        return time.perf_counter() - self.granted_at


class Child:
    """The parent's side of one candidate process."""

    def __init__(self, name: str, argv: list[str], log_path, env: dict | None = None, probe: bool = False):
        self.name = name
        self.probe = probe  # takes a turn every round until the others have finished, then is stopped
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        child_env = {**os.environ, **(env or {}), ENV: f"{go_r},{done_w}"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(go_r, done_w),
            env=child_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        os.close(go_r)
        os.close(done_w)
        self._go = os.fdopen(go_w, "w", buffering=1)
        self._done = os.fdopen(done_r, "r", buffering=1)
        self.steps: list[dict] = []
        self.result: dict | None = None
        self.finished = False

    def receive(self) -> dict:
        line = self._done.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"candidate {self.name} exited (code {code}) without reporting; see {self.log.name}")
        return json.loads(line)

    def grant(self, command: str = "go") -> dict:
        self._go.write(command + "\n")
        self._go.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run_interleaved(children: list[Child], on_message=None) -> None:
    """Wait until every child is set up, then grant turns round-robin until all have finished.

    A child that has reported its last step gets one more (untimed) turn to save its results and
    exit, alone on the machine, before the others go on. Probes are stopped once no trainer is left.
    """
    for child in children:
        msg = child.receive()
        if msg.get("event") != "ready":
            raise RuntimeError(f"{child.name}: expected 'ready', got {msg}")
        if on_message:
            on_message(child, msg)
    active = list(children)
    while active:
        trainers_left = any(not c.probe for c in active)
        for child in list(active):
            msg = child.grant("go" if trainers_left or not child.probe else "stop")
            if on_message:
                on_message(child, msg)
            if msg["event"] == "step":
                child.steps.append(msg)
                if msg.get("last"):
                    msg = child.grant()  # the finishing turn: save, report, exit
                    if msg["event"] != "result":
                        raise RuntimeError(f"{child.name}: expected 'result', got {msg}")
            if msg["event"] == "result":
                child.result = msg
                child.finished = True
                child.proc.wait()
                active.remove(child)
