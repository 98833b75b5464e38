"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step, always), progress on the console, and
the experiment trackers chosen with ``logger: [...]`` (``stapo.trainer.trackers``).

In a terminal the progress is a live bar: step/total, ETA, and the last reward, entropy, S2T silenced
fraction and held-out accuracy. Elsewhere (CI, a log file) it is one plain line per step.
``quiet_progress_bars`` turns third-party bars (transformers' "Writing model shards", datasets, the
hub) off; ``train`` runs inside it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .trackers import scalars, start_trackers

# (label, metrics key, format): what the bar and the plain lines show, the last value of each
STATUS = (
    ("reward", "reward/mean", "{:.3f}"),
    ("H", "actor/entropy", "{:.3f}"),
    ("s2t", "s2t/masked_fraction", "{:.2%}"),
    ("eval", "eval/accuracy", "{:.3f}"),
)


class RunLogger:
    """``with RunLogger(run_dir, cfg, start_step) as log: log.log(step, metrics); log.checkpoint(step, path)``.

    Only rank 0 writes (``write``); ``quiet`` hides the console output; ``console`` is for tests.
    """

    def __init__(self, run_dir: Path, cfg, start_step: int = 0, quiet: bool = False, write: bool = True,
                 console: Console | None = None):  # fmt: skip
        from ..config.schema import to_dict

        self.run_dir, self.path, self.write = Path(run_dir), Path(run_dir) / "metrics.jsonl", write
        self.total, self.start_step = cfg.steps, start_step
        loggers = list(cfg.logger)
        self.console = console or Console(quiet=quiet or not write)
        self.show_steps = "console" in loggers and write and not quiet
        self.live = self.show_steps and self.console.is_terminal
        self._trackers_wanted = [n for n in loggers if n != "console"] if write else []
        self._tracker_args = (self.run_dir.name, cfg.project, to_dict(cfg))
        self.trackers: list = []
        self._last: dict[str, float] = {}
        self._progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, disable=not self.live,
        )  # fmt: skip
        self._task = self._progress.add_task("train", total=self.total, completed=start_step, status="")
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        with self._stack as stack:
            self.trackers = start_trackers(self._trackers_wanted, self.run_dir, *self._tracker_args, self.start_step)
            for tracker in self.trackers:
                stack.callback(tracker.close)
            stack.enter_context(self._progress)
            self._t0 = time.monotonic()
            self._stack = stack.pop_all()  # keep everything open until __exit__
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        record = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: a torn line is dropped when the run resumes
            from ..errors import UserError

            raise UserError(f"cannot write {self.path} ({err.strerror}); the checkpoints are intact: free "
                            f"space, then `stapo train --resume {self.run_dir}`") from None
        numbers = scalars(metrics)
        for tracker in self.trackers:
            tracker.log_metrics(step, numbers)
        self._last |= {key: numbers[key] for _, key, _ in STATUS if key in numbers}
        status = self.status()
        if self.live:
            self._progress.update(self._task, completed=step, status=status)
        elif self.show_steps:
            self._print(f"step {step}/{self.total}  {status}  {self._times(step)}".rstrip())

    def checkpoint(self, step: int, path: str | Path) -> None:
        """Tell the trackers where checkpoint ``step`` was written."""
        if self.write:
            for tracker in self.trackers:
                tracker.log_checkpoint(step, str(path))

    def status(self) -> str:
        return "  ".join(f"{label} {fmt.format(self._last[key])}" for label, key, fmt in STATUS if key in self._last)

    def message(self, text: str) -> None:
        self._print(text)

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _times(self, step: int) -> str:
        done, elapsed = step - self.start_step, time.monotonic() - self._t0
        if done <= 0:
            return ""
        eta = elapsed / done * (self.total - step)
        return f"elapsed {_hms(elapsed)}  eta {_hms(eta)}"


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers', datasets' and the hub's tqdm bars off inside the block, as they were after it."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    try:  # datasets is only needed to read dataset folders and hub datasets (a GPU image may lack it)
        import datasets
    except ImportError:
        datasets = None
    was = (transformers_logging.is_progress_bar_enabled(),
           datasets is not None and datasets.is_progress_bar_enabled(),
           hub.are_progress_bars_disabled())  # fmt: skip
    transformers_logging.disable_progress_bar()
    if datasets is not None:
        datasets.disable_progress_bars()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            transformers_logging.enable_progress_bar()
        if was[1]:
            datasets.enable_progress_bars()
        if not was[2]:
            hub.enable_progress_bars()


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a torn last line (a killed or still-running writer) is skipped."""
    from ..diagnostics.report import load_metrics

    return load_metrics(run_dir)


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep the rows up to ``last_step`` (a resumed run re-logs the steps it repeats) and drop a torn
    last line; the file is replaced atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
