"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step), a rich progress bar, TensorBoard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, tensorboard: bool = False,
                 quiet: bool = False, write: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.write = write  # only rank 0 writes; the others stay quiet
        self.console = Console(stderr=True, quiet=quiet)
        self._progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            disable=quiet or not sys.stderr.isatty(),
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._tb = None
        if tensorboard and write:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard logging needs: pip install 'stapo[tensorboard]'") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
        if self._tb is not None:
            self._tb.close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        record = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        status = "  ".join(
            f"{label} {metrics[key]:.3g}"
            for label, key in [("reward", "reward/mean"), ("H", "actor/entropy"), ("s2t", "s2t/masked_fraction")]
            if key in metrics
        )
        self._progress.update(self._task, completed=step, status=status)
        if not self._progress.live.is_started or self._progress.disable:
            self.console.log(f"step {step}  {status}")

    def message(self, text: str) -> None:
        self.console.log(text)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop lines after ``last_step`` (a resumed run re-logs the steps it repeats)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
