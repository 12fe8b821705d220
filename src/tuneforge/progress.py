"""Progress of long work: a live bar on a terminal, and a plain line every so often in a log.

Rich draws nothing while a bar runs when stderr is not a terminal (CI, `nohup`, a pipe), so a
long step would look hung. There the same figures (done/total, rate, elapsed, ETA and any fields)
go out as one plain line at most every `LOG_EVERY_S` seconds, and once at the end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .console import new_console, plain

LOG_EVERY_S = 20.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogLines:
    """Throttled plain progress lines for a console that is not a terminal. The pace and ETA are measured
    from the first update on, as rich's bars measure theirs: the time before it (opening a file, loading,
    a first step's warm-up) is no measure of the rest, so the first line leaves them out."""

    def __init__(self, console: Console, description: str, total: int, done: int = 0):
        self.console, self.description, self.total = console, description, total
        self.started, self.done, self.last = time.perf_counter(), done, float("-inf")
        self.first: tuple[float, int] | None = None  # the time and count of the first update

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int, fields: str = "") -> None:
        self.done, now = done, time.perf_counter()
        self.first = self.first or (now, done)
        if done < self.total and now - self.last < LOG_EVERY_S:
            return
        self.last = now
        since, first_done = self.first
        rate = (done - first_done) / (now - since) if now > since and done > first_done else None
        line = f"{self.description} {done}/{self.total} ({done / max(self.total, 1):.0%}){fields}"
        if rate:
            line += f" · {rate:.1f}/s" if rate >= 1 else f" · {1 / rate:.1f} s each"
        line += f" · elapsed {_clock(now - self.started)}"
        if done >= self.total or rate:
            line += f" · eta {_clock(max(self.total - done, 0) / rate if rate else 0)}"
        self.console.print(plain(line), highlight=False, soft_wrap=True)


def bar_columns(*fields: str) -> list:
    """The columns of every tuneforge bar: what (the task's description, plain text: it names data files and
    models), bar, done/total, percent, fields, elapsed, ETA."""
    return [
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient bar on stderr (or log lines when stderr is not a terminal); yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    console = new_console(stderr=True)
    if not console.is_terminal:
        yield LogLines(console, description, total).advance
        return
    with Progress(*bar_columns(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def activity(description: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Work of no known size (a download another program makes): a spinner on stderr, or when stderr is
    not a terminal the description at once and then the latest news at most every `LOG_EVERY_S`
    seconds; yields `update(news)`."""
    if not enabled:
        yield lambda news: None
        return
    console = new_console(stderr=True)
    if console.is_terminal:
        with console.status(plain(description)) as status:
            yield lambda news: status.update(console.render_str(plain(f"{description}: {news}")))
        return
    console.print(plain(description), highlight=False, soft_wrap=True)
    started = last = time.perf_counter()

    def update(news: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S:
            last = now
            line = plain(f"{description}: {news} · elapsed {_clock(now - started)}")
            console.print(line, highlight=False, soft_wrap=True)

    yield update


@contextlib.contextmanager
def library_bars(shown: bool) -> Iterator[None]:
    """transformers' own bars (one per weight load) off while `shown` is false: a Python caller who asks for
    no progress gets none on stderr, and their own setting is back once the work returns."""
    from transformers.utils import logging as transformers_logging

    was_shown = transformers_logging.is_progress_bar_enabled()
    if not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            transformers_logging.enable_progress_bar()
