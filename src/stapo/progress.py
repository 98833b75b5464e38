"""Progress of long work (eval samples, analyze phases, the demo's warm start), on stderr.

In a terminal: one rich bar per task (done/total, ETA). In a pipe or a log file: plain lines, one at a
task's first step, then at most one per ``STAPO_PROGRESS_EVERY`` seconds (default 10), and one when
it finishes, so a log shows signs of life without carriage returns:

    stapo eval: amc23: 64/1280 samples (5%), 0:12 elapsed, ETA 3:48
    stapo eval: amc23: 1280/1280 samples, done in 4:01

``quiet`` (the commands' ``-q/--quiet``) silences everything here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

EVERY_ENV = "STAPO_PROGRESS_EVERY"


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Task:
    """done/total of one named piece of work; ``advance(n)`` after each part."""

    def __init__(self, reporter: Reporter, name: str, total: int, unit: str):
        self.reporter, self.name, self.total, self.unit = reporter, name, total, unit
        self.done, self.start, self._said = 0, time.monotonic(), None
        self._bar_id = reporter._bar.add_task(f"{reporter.prefix}{name}", total=total) if reporter._bar else None

    def advance(self, n: int = 1, note: str = "") -> None:
        """``n`` more parts done; ``note`` (e.g. the current loss) ends the plain line."""
        self.done += n
        r = self.reporter
        if r._bar is not None:
            r._bar.update(self._bar_id, advance=n)
            return
        now = time.monotonic()
        if self.done >= self.total or self._said is None or now - self._said >= r.every:
            self._said = now
            r.say(self.line(now - self.start) + (f", {note}" if note else ""))

    def line(self, elapsed: float) -> str:
        head = f"{self.name}: {self.done}/{self.total} {self.unit}"
        if self.done >= self.total:
            return f"{head}, done in {_clock(elapsed)}"
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return (f"{head} ({100 * self.done // max(self.total, 1)}%), {_clock(elapsed)} elapsed, "
                f"ETA {_clock(eta) if eta is not None else '?'}")


class Reporter:
    """``with Reporter("eval", quiet=args.quiet) as rep:`` then ``rep.phase(text)`` and
    ``rep.task(name, total)``. ``write`` replaces stderr for the plain lines (e.g. a logger)."""

    def __init__(self, command: str, *, quiet: bool = False, write: Callable[[str], None] | None = None,
                 every: float | None = None):
        self.prefix = f"stapo {command}: " if command else ""
        self.quiet = quiet
        self.every = float(os.environ.get(EVERY_ENV, "10")) if every is None else every
        self._write = write or (lambda text: print(text, file=sys.stderr, flush=True))
        self._live = not quiet and write is None and sys.stderr.isatty()
        self._bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if self._live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
            self._bar = self._stack.enter_context(Progress(*columns, console=Console(stderr=True)))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._bar = None

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(f"{self.prefix}{text}", markup=False, highlight=False)
        else:
            self._write(f"{self.prefix}{text}")

    def hush_library_bars(self) -> None:
        """Off a terminal (or quiet), transformers' own tqdm bars ("Loading weights") would write carriage
        returns into the log: turn them off for this process."""
        if not self._live:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    phase = say  # a phase is announced as it starts: what the command is doing now

    def task(self, name: str, total: int, unit: str = "samples") -> Task:
        return Task(self, name, total, unit)
