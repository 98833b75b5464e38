"""The reward worker process: one per pool slot, started with ``spawn``, fed one item at a time.

Protocol on the worker's end of its own ``Pipe``:

    -> ("importing", pid)  before it imports the reward's module (the pool's import time limit starts)
    -> ("imported", pid)   after it (the start-up limit again, for math-verify's warm-up)
    -> ("ready", pid)      once imports and a warm-up item are done
       or ("user-error", one line) for a reward that cannot be used, ("error", traceback), and exit
    <- ("score", (response, gold), kwargs, soft_s)  -> (value, status)
    <- ("verify", (gold, pred), {}, soft_s)         -> (value, status)   value 1.0 / 0.0
    <- ("parse", (answer,), {}, soft_s)             -> (value, status)   1.0 if it parsed; now cached
    <- None                                         -> exit

``status`` is "ok", "timeout" (the soft timer fired), "error" (the reward raised; scored 0.0) or
"invalid" (it returned NaN, an infinity or a non-number; scored 0.0, with a third element saying what).

Two time limits guard each item. Here, a soft ``setitimer`` alarm after ``soft_s`` seconds raises
``SoftTimeout`` in Python code, so the worker survives and answers 0.0 at no restart cost. It is a
``BaseException``, so math-verify's and SymPy's ``except Exception`` cannot swallow it. Code that
never returns to the interpreter (a C-level big-integer power) ignores it; the pool's hard
wall-clock deadline then kills this process and starts a replacement.

Containment: the worker leads its own process group, so the pool's kill takes whatever the reward
function started (``subprocess``, ``fork``) with it; a worker whose pool is gone kills its group on
the way out. Its stdout and stderr (a reward's prints, its children's too) go through a pipe: the
first ``OUTPUT_CAP`` bytes reach the trainer's stderr, never its stdout, and the rest is counted
and dropped, with a warning line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback

from ..errors import UserError
from .registry import InvalidReward

# bytes of a worker's output (stdout and stderr together) passed on to the trainer's stderr
OUTPUT_CAP = 64 * 1024


class SoftTimeout(BaseException):
    """Raised by the worker's alarm inside the reward function."""


class _Alarm:
    armed = False


def _on_alarm(signum, frame):
    if _Alarm.armed:  # a late signal after the item finished must not escape into the loop
        _Alarm.armed = False
        raise SoftTimeout


def _limit_memory(extra_mb: int | None) -> None:
    """Cap this process's address space at its current size + ``extra_mb``, so a memory bomb such as
    ``10^{10^{10}}!`` fails fast with MemoryError instead of swapping the machine."""
    if not extra_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + extra_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, ImportError):  # not Linux: no cap, the hard kill still applies
        pass


class _CappedOutput:
    """fds 1 and 2 into a pipe; a thread passes the first ``cap`` bytes to the original stderr."""

    def __init__(self, cap: int):
        self.cap, self.passed, self.dropped = cap, 0, 0
        self.err = os.dup(2)
        read, write = os.pipe()
        for fd in (1, 2):
            os.dup2(write, fd)
        os.close(write)
        self.thread = threading.Thread(target=self._drain, args=(read,), daemon=True, name="stapo-reward-output")
        self.thread.start()

    def _say(self, text: str) -> None:
        os.write(self.err, f"stapo: reward worker {os.getpid()}: {text}\n".encode())

    def _drain(self, read: int) -> None:
        while chunk := os.read(read, 1 << 16):
            keep = chunk[: max(0, self.cap - self.passed)]
            if keep:
                os.write(self.err, keep)
                self.passed += len(keep)
            if len(keep) < len(chunk) and not self.dropped:
                self._say(f"output past {self.cap // 1024} KiB is dropped (reward functions should not print)")
            self.dropped += len(chunk) - len(keep)

    def close(self) -> None:
        """Flush what Python buffered, let the thread read it (children may hold the pipe open: a
        short wait only), then say how much was dropped."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)
        self.thread.join(timeout=0.5)
        if self.dropped:
            self._say(f"dropped {self.dropped} bytes of output in all (kept the first {self.passed})")


def _end_group(signum=None, frame=None) -> None:
    """Kill this worker's process group (itself included): what the reward started dies with it."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _setup(conn, spec: str, signature: str):
    # math-verify logs the (here deliberately) disabled timeouts and every failed parse with the
    # full hostile input; the pool counts failures instead
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    from .registry import resolve_reward

    conn.send(("importing", os.getpid()))
    score = resolve_reward(spec, signature)
    conn.send(("imported", os.getpid()))
    from .dapo import dapo_equal
    from .math_reward import answers_equal, math_reward, parse_answer

    equal = dapo_equal if spec == "dapo" else answers_equal
    # warm-up: compile math-verify's regexes and load SymPy's lazy modules before the clock runs
    math_reward("so \\boxed{\\frac{1}{2}}", "0.5")
    return {"score": score, "verify": equal, "parse": lambda answer: bool(parse_answer(answer))}


def _run(fn, args, kwargs, soft_timeout: float) -> tuple:
    _Alarm.armed = True
    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    try:
        return float(fn(*args, **kwargs)), "ok"
    except SoftTimeout:
        return 0.0, "timeout"
    except InvalidReward as err:
        return 0.0, "invalid", str(err)
    except Exception:  # noqa: BLE001 - MemoryError, RecursionError, anything a hostile input raises
        return 0.0, "error"
    finally:
        _Alarm.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def worker_main(conn, spec: str, signature: str, memory_limit_mb: int | None):
    os.setpgrp()  # the pool kills this group: the reward's children go with the worker
    signal.signal(signal.SIGTERM, _end_group)  # multiprocessing terminates daemons so at exit
    output = _CappedOutput(OUTPUT_CAP)
    try:
        ops = _setup(conn, spec, signature)
        signal.signal(signal.SIGALRM, _on_alarm)
        _limit_memory(memory_limit_mb)
    except UserError as err:  # the reward cannot be used: one line for the user
        conn.send(("user-error", str(err)))
        output.close()
        return
    except BaseException:  # noqa: BLE001 - the pool reports the traceback as a start-up error
        conn.send(("error", traceback.format_exc()))
        output.close()
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the pool is gone, so no one will kill the group for us
            output.close()
            _end_group()
        if msg is None:
            output.close()
            return
        op, args, kwargs, soft_s = msg
        try:
            result = _run(ops[op], args, kwargs, soft_s)
        except SoftTimeout:  # fired between the reward's return and the disarm
            result = (0.0, "timeout")
        conn.send(result)
