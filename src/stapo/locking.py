"""One writer per folder: an exclusive ``fcntl`` lock on ``DIR/.lock`` that holds the writer's PID.

Used by the trainer's run directory and by ``stapo eval --out``. A second writer stops at once,
naming the PID that holds the folder. The kernel drops the lock when its holder exits, however it
exits, so the lock of a killed process is free at once; the PID it left in the file is reported when
the next writer takes over. Within one process the lock is re-entrant (the eval CLI takes it before
loading the model, ``evaluate`` takes it again), so a caller never locks itself out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"
_HELD: dict[str, list] = {}  # realpath of a held lock file -> [fd, depth]


class LockedError(UserError):
    """Another live process is writing to this folder."""


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.lock``; ``label`` and ``hint`` word the refusal."""

    def __init__(self, directory: str | Path, label: str = "run directory",
                 hint: str = "choose another run_name"):
        self.run_dir = Path(directory)
        self.path = self.run_dir / LOCK_FILE
        self.label, self.hint = label, hint
        self._key: str | None = None

    def acquire(self, warn=None) -> DirLock:
        key = os.path.realpath(self.path)
        if key in _HELD:  # this process already writes here
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd, retries=20)  # the holder writes its PID right after locking
            os.close(fd)
            raise LockedError(
                f"{self.label} {self.run_dir} is in use by another stapo process (PID {holder or 'unknown'}); "
                f"wait for it to finish or stop it, or {self.hint}"
            ) from None
        previous = _read_pid(fd)
        if previous and previous != str(os.getpid()):
            (warn or _warn)(f"warning: {self.run_dir} was last locked by PID {previous}, which ended without "
                            "releasing it (killed or crashed); taking over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            os.ftruncate(held[0], 0)  # an empty lock file means the last writer finished cleanly
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
        self._key = None

    @contextlib.contextmanager
    def held(self):
        """``with lock.held():`` the lock for a block, released however the block ends."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()


def _read_pid(fd: int, retries: int = 0) -> str:
    for _ in range(retries + 1):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        if retries:
            time.sleep(0.01)
    return ""


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
