"""The reward worker process: one per pool slot, started with ``spawn``, fed one item at a time.

Protocol on the worker's end of its own ``Pipe``:

    -> ("ready", pid)  once imports and a warm-up item are done (or ("error", traceback) and exit)
    <- ("score", (response, gold), kwargs, soft_s)  -> (value, status)
    <- ("verify", (gold, pred), {}, soft_s)         -> (value, status)   value 1.0 / 0.0
    <- ("parse", (answer,), {}, soft_s)             -> (value, status)   1.0 if it parsed; now cached
    <- None                                         -> exit

``status`` is "ok", "timeout" (the soft timer fired) or "error" (the reward raised; scored 0.0).

Two time limits guard each item. Here, a soft ``setitimer`` alarm after ``soft_s`` seconds raises
``SoftTimeout`` in Python code, so the worker survives and answers 0.0 at no restart cost. It is a
``BaseException``, so math-verify's and SymPy's ``except Exception`` cannot swallow it. Code that
never returns to the interpreter (a C-level big-integer power) ignores it; the pool's hard
wall-clock deadline then kills this process and starts a replacement.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback


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


def _setup(spec: str, signature: str):
    # math-verify logs the (here deliberately) disabled timeouts and every failed parse with the
    # full hostile input; the pool counts failures instead
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    from .dapo import dapo_equal
    from .math_reward import answers_equal, math_reward, parse_answer
    from .registry import resolve_reward

    score = resolve_reward(spec, signature)
    equal = dapo_equal if spec == "dapo" else answers_equal
    # warm-up: compile math-verify's regexes and load SymPy's lazy modules before the clock runs
    math_reward("so \\boxed{\\frac{1}{2}}", "0.5")
    return {"score": score, "verify": equal, "parse": lambda answer: bool(parse_answer(answer))}


def _run(fn, args, kwargs, soft_timeout: float) -> tuple[float, str]:
    _Alarm.armed = True
    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    try:
        return float(fn(*args, **kwargs)), "ok"
    except SoftTimeout:
        return 0.0, "timeout"
    except Exception:  # noqa: BLE001 - MemoryError, RecursionError, anything a hostile input raises
        return 0.0, "error"
    finally:
        _Alarm.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def worker_main(conn, spec: str, signature: str, memory_limit_mb: int | None):
    try:
        ops = _setup(spec, signature)
        signal.signal(signal.SIGALRM, _on_alarm)
        _limit_memory(memory_limit_mb)
    except BaseException:  # noqa: BLE001 - the pool reports the traceback as a start-up error
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the pool is gone
        if msg is None:
            return
        op, args, kwargs, soft_s = msg
        try:
            result = _run(ops[op], args, kwargs, soft_s)
        except SoftTimeout:  # fired between the reward's return and the disarm
            result = (0.0, "timeout")
        conn.send(result)
