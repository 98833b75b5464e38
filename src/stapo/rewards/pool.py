"""A pool of reward worker processes that never hangs: every item has a hard wall-clock limit.

Why not ``multiprocessing.Pool`` or a thread pool: math-verify's own timeouts use SIGALRM, which
only works in a main thread, and a ``Pool`` cannot kill the one task that overruns. Here each
worker is a persistent ``spawn`` process with its own ``Pipe``, fed one item at a time:

    parent                                   worker i
    send(item) ------------------------------> score under a soft alarm (0.75 x limit)
    wait(conns, until the earliest deadline) <- (value, status)
    past its deadline: SIGKILL worker i, start a replacement, the item scores 0.0

So a hostile item costs at most ``timeout`` seconds of one worker; in the common case (the soft
alarm fires in Python code) it costs no restart at all. The pool starts once and is reused.
It is driven from one thread (the trainer's or the evaluator's); it is not thread-safe.

Parse once: for the ``math`` reward the parent reads the boxed answer itself (linear-time string
code, ``extract.py``) and first parses each new gold once, under the longer ``gold_timeout`` (golds
are trusted data; a Minerva formula can take ~1 s on a cold worker). Items are routed to the worker
that already parsed their gold (its ``parse_answer`` cache), and an idle worker steals from the
longest queue, so routing never leaves a worker idle while items wait.

Bound: with W workers, limit t and a batch of N responses, ``score_batch`` returns within about
ceil(N / W) * t (plus, for new golds, ceil(G / W) * gold_timeout) plus restart latency, whatever
the responses contain.

Metrics (``stats`` cumulative, ``pop_metrics()`` since the last pop): ``reward/items``,
``reward/timeouts`` (soft or hard), ``reward/worker_restarts`` (hard kills and crashes),
``reward/errors`` (the reward raised; scored 0.0), ``reward/invalid`` (it returned NaN, an infinity
or a non-number; scored 0.0 and warned about), ``reward/gold_timeouts`` (a gold that did not
parse in ``gold_timeout``), ``reward/seconds`` (wall time in the pool).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import signal
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait
from typing import Any

from .extract import has_box
from .math_reward import MAX_ANSWER_CHARS, final_answer, gold_parts, parse_keys
from .registry import BUILTIN, SIGNATURES, RewardError, check_spec, reward_spec
from .terms import as_overlong, format_term, overlong_penalty

Gold = str | Sequence[str]

# how long a worker may take to import math-verify and warm up (a loaded CI machine is slow)
STARTUP_TIMEOUT = 120.0
# how long a worker may take to import a user's reward module (``import_timeout``'s default)
IMPORT_TIMEOUT = 60.0
# the in-worker soft alarm fires at this fraction of the hard limit, leaving time to answer
SOFT_FRACTION = 0.75
# answer string -> worker slot that parsed it, remembered for routing (LRU-bounded)
HOME_SIZE = 65536
METRIC_KEYS = (
    "reward/items",
    "reward/timeouts",
    "reward/worker_restarts",
    "reward/errors",
    "reward/invalid",
    "reward/gold_timeouts",
    "reward/seconds",
)


@dataclasses.dataclass
class _Worker:
    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Any  # parent's end of the worker's Pipe
    started: float
    ready: bool = False
    item: int | None = None  # index of the task it is working on
    deadline: float = 0.0  # of its item, or of its start-up phase
    importing: bool = False  # in the user's module import (see worker.py's protocol)


@dataclasses.dataclass
class _Task:
    op: str  # "score", "verify" or "parse" (see worker.py)
    args: tuple
    kwargs: dict
    keys: list[str]  # answer strings it parses (math_reward.parse_keys); keys[0] routes it


def _as_text(x: Any) -> str:
    """A response as ``str``: bytes (possibly invalid UTF-8) are decoded with replacement."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    return "" if x is None else str(x)


def _as_gold(g: Any) -> str | list[str]:
    if isinstance(g, (list, tuple)):
        return [_as_text(p) for p in g]
    if isinstance(g, float) and g.is_integer():
        return str(int(g))  # AMC's 27.0 -> "27"
    return _as_text(g)


def _kill_group(w: _Worker) -> None:
    """SIGKILL the worker's process group: the worker and whatever its reward started. Called before
    ``join`` reaps the worker, so its pid (the group's id) cannot have been reused yet; once only."""
    if w.conn.closed:
        return
    try:
        os.killpg(w.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is empty already
        pass
    w.proc.join(timeout=5.0)
    w.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        wait([w.proc.sentinel], timeout=1.0)  # exited (or not) without being reaped
        _kill_group(w)


class RewardPool:
    """Score responses in ``num_workers`` spawn processes, each item under a hard ``timeout``.

    Args:
        reward: "math" (math-verify, default), "dapo" (string verifier), "module:function" or a
            module-level function with verl's or TRL's signature (see ``registry``).
        num_workers: worker processes.
        timeout: hard wall-clock limit per item, seconds; an overrun scores 0.0.
        strict: ``math``: require a ``\\boxed{}`` answer (no fallback extraction).
        format_weight: weight of the format penalty (0 = off), see ``terms.format_term``.
        overlong: DAPO soft overlong penalty: ``None`` (off), ``(max_len, cache_len[, factor])`` or an
            ``OverlongConfig``; needs ``lengths`` (response tokens) in ``score_batch``.
        signature: "auto", "verl", "trl" or "native" for a user function.
        gold_timeout: hard limit for parsing one new gold answer (``math``), seconds.
        memory_limit_mb: extra address space a worker may allocate (``None``: unlimited).
        import_timeout: seconds a worker may take to import a ``module:function`` reward's module.

    A ``module:function`` reward is imported and checked in a worker when the pool is built, so a
    module that is missing, raises or hangs at import is a ``RewardError`` here, before any batch.
    Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        reward: str | Callable = "math",
        num_workers: int = 2,
        timeout: float = 2.0,
        strict: bool = False,
        format_weight: float = 0.0,
        overlong=None,
        *,
        signature: str = "auto",
        gold_timeout: float = 10.0,
        memory_limit_mb: int | None = 2048,
        import_timeout: float = IMPORT_TIMEOUT,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0 or not gold_timeout > 0 or not import_timeout > 0:
            raise ValueError(f"timeout, gold_timeout and import_timeout must be > 0 seconds, "
                             f"got {timeout}, {gold_timeout}, {import_timeout}")
        if signature not in SIGNATURES:
            raise ValueError(f"signature={signature!r}: expected one of {SIGNATURES}")
        self.reward = reward_spec(reward)
        check_spec(self.reward)  # its shape only: the user's module is imported in the workers
        self.import_timeout = float(import_timeout)
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.gold_timeout = float(gold_timeout)
        self.strict = strict
        self.format_weight = float(format_weight)
        self.overlong = as_overlong(overlong)
        self._signature = signature
        self._memory_limit_mb = memory_limit_mb
        self._ctx = multiprocessing.get_context("spawn")
        self._total: collections.Counter = collections.Counter()
        self._since_pop: collections.Counter = collections.Counter()
        self._home: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._unparsable: set[str] = set()  # answers whose parse overran its limit: not prefetched again
        self.last_item_seconds: list[float] = []  # per input of the last call: dispatch -> answer or kill
        self.last_item_status: list[str] = []  # per input of the last call: ok/timeout/error/no-answer
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        if self.reward not in BUILTIN:  # a user's module: missing, raising or hanging fails here
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # ---- lifecycle -------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        from .worker import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self.reward, self._signature, self._memory_limit_mb),
            daemon=True,  # never outlive the trainer
            name="stapo-reward",
        )
        proc.start()
        child.close()
        now = time.monotonic()
        return _Worker(proc=proc, conn=parent, started=now, deadline=now + STARTUP_TIMEOUT)

    def _replace(self, w: _Worker) -> None:
        """Kill ``w`` and its children (SIGKILL: a hung worker ignores anything softer) and start a fresh one."""
        _kill_group(w)
        slot = self._workers.index(w)
        self._workers[slot] = self._spawn()
        for key in [k for k, s in self._home.items() if s == slot]:  # its parse cache is gone
            del self._home[key]
        self._count("reward/worker_restarts")

    def start(self) -> RewardPool:
        """Block until every worker has imported its reward (otherwise the first batch waits)."""
        self._run([], self.timeout)
        return self

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RewardPool:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- metrics ---------------------------------------------------------------------------
    def _count(self, key: str, n: float = 1) -> None:
        self._total[key] += n
        self._since_pop[key] += n

    @property
    def stats(self) -> dict[str, float]:
        """Cumulative counters since the pool started."""
        return {k: self._total.get(k, 0) for k in METRIC_KEYS}

    def pop_metrics(self) -> dict[str, float]:
        """Counters since the last call (for per-step logging), then reset them."""
        out = {k: self._since_pop.get(k, 0) for k in METRIC_KEYS}
        self._since_pop.clear()
        return out

    # ---- scheduling ------------------------------------------------------------------------
    def _run(self, tasks: list[_Task], timeout: float) -> tuple[list[tuple], list[float]]:
        """Run every task, at most one per worker at a time, each under ``timeout`` seconds.

        Returns (value, status[, detail]) per task, in order, and each task's seconds from dispatch to
        answer.
        """
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")
        t0 = time.monotonic()
        results: list[Any] = [None] * len(tasks)
        seconds = [0.0] * len(tasks)
        queues: list[collections.deque] = [collections.deque() for _ in self._workers]
        for i, t in enumerate(tasks):
            queues[self._slot_for(t, i)].append(i)
        while True:
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if not w.ready or w.item is not None or (i := _next_item(queues, slot)) is None:
                    continue
                t = tasks[i]
                try:
                    w.conn.send((t.op, t.args, t.kwargs, timeout * SOFT_FRACTION))
                except OSError:  # died while idle (OOM killer): retry the item on its replacement
                    queues[slot].appendleft(i)
                    self._replace(w)
                    continue
                w.item, w.deadline, seconds[i] = i, now + timeout, now
            busy = [w for w in self._workers if w.item is not None]
            starting = [w for w in self._workers if not w.ready]
            if not busy and not any(queues) and (tasks or not starting):
                break
            wait_s = min(w.deadline for w in busy + starting) - now
            for conn in wait([w.conn for w in busy + starting], timeout=max(wait_s, 0.0)):
                w = next(w for w in self._workers if w.conn is conn)
                item, slot = w.item, self._workers.index(w)
                if self._receive(w, results) and item is not None:
                    self._remember(tasks[item].keys[:2], slot)  # this worker has them parsed now
                if item is not None:
                    seconds[item] = time.monotonic() - seconds[item]
            now = time.monotonic()
            for w in list(self._workers):
                if w.item is not None and now >= w.deadline:
                    results[w.item] = (0.0, "timeout")
                    seconds[w.item] = now - seconds[w.item]
                    self._replace(w)
                elif not w.ready and now >= w.deadline:
                    self._startup_overran(w)
        if tasks:
            self._count("reward/seconds", time.monotonic() - t0)
        return results, seconds

    def _slot_for(self, task: _Task, i: int) -> int:
        """The worker that parsed this task's gold before, else one chosen by the gold string."""
        if not task.keys:
            return i % len(self._workers)
        route = task.keys[0]
        home = self._home.get(route)
        return home if home is not None else hash(route) % len(self._workers)

    def _remember(self, keys: list[str], slot: int) -> None:
        for key in keys:
            self._home[key] = slot
            self._home.move_to_end(key)
        while len(self._home) > HOME_SIZE:
            self._home.popitem(last=False)

    def _startup_overran(self, w: _Worker) -> None:
        _kill_group(w)
        if w.importing:
            module = self.reward.partition(":")[0]
            raise RewardError(f"reward {self.reward!r}: importing module {module!r} did not finish within "
                              f"{self.import_timeout:g} s (import_timeout); does it wait for something at import?")
        raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT:.0f}s")

    def _receive(self, w: _Worker, results: list) -> bool:
        """Read ``w``'s message; True if it answered its item (False: start-up or death)."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):  # the worker died (segfault, OOM killer)
            if not w.ready:
                _kill_group(w)
                if w.importing:  # the user's module ended the process (os._exit, a crash in C code)
                    raise RewardError(f"reward {self.reward!r}: the reward worker exited while importing its "
                                      f"module (exit code {w.proc.exitcode})")
                raise RuntimeError(f"reward worker exited during start-up (exit code {w.proc.exitcode})")
            results[w.item] = (0.0, "error")
            self._replace(w)
            return False
        if not w.ready:
            kind = msg[0]
            if kind in ("importing", "imported"):  # the user's import has its own time limit
                w.importing = kind == "importing" and self.reward not in BUILTIN
                w.deadline = time.monotonic() + (self.import_timeout if w.importing else STARTUP_TIMEOUT)
                return False
            if kind == "user-error":
                raise RewardError(msg[1])
            if kind == "error":
                raise RuntimeError(f"reward worker failed to start ({self.reward!r}):\n{msg[1]}")
            w.ready = True
            return False
        results[w.item] = msg
        w.item = None
        return True

    def _parse_once(self, answers: Iterable[str], timeout: float, metric: str) -> None:
        """Parse each answer string the pool has no parse of yet, once, spread over the workers."""
        keys = [
            k
            for k in dict.fromkeys(answers)
            if k not in self._home and k not in self._unparsable and len(k) <= MAX_ANSWER_CHARS
        ]
        results, _ = self._run([_Task("parse", (k,), {}, [k]) for k in keys], timeout)
        for key, result in zip(keys, results):
            if result[1] != "ok":
                self._unparsable.add(key)
                self._count(metric)

    def _run_items(self, tasks: list[_Task | None]) -> list[float]:
        """Run the items (``None``: no answer to check, 0.0), record their metrics, return values."""
        real = [t for t in tasks if t is not None]
        results, seconds = self._run(real, self.timeout)
        it = iter(zip(results, seconds))
        values, self.last_item_seconds, self.last_item_status = [], [], []
        invalid = []
        for i, t in enumerate(tasks):
            result, sec = next(it) if t is not None else ((0.0, "no-answer"), 0.0)
            value, status = result[:2]
            values.append(value)
            self.last_item_seconds.append(sec)
            self.last_item_status.append(status)
            if status in ("timeout", "error"):
                self._count(f"reward/{status}s")
            elif status == "invalid":
                invalid.append((i, result[2]))
        self._count("reward/items", len(tasks))
        if invalid:
            self._count("reward/invalid", len(invalid))
            i, what = invalid[0]
            warnings.warn(f"reward {self.reward!r}: {len(invalid)} of {len(tasks)} items returned no valid number "
                          f"(item {i} {what}); they score 0.0 and are counted in reward/invalid",
                          RuntimeWarning, stacklevel=3)
        return values

    # ---- public scoring --------------------------------------------------------------------
    def score_batch(
        self,
        responses: Sequence[str],
        golds: Sequence[Gold],
        lengths: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        data_sources: Sequence[str] | None = None,
        extra_infos: Sequence[dict] | None = None,
        shaped: bool = True,
    ) -> list[float]:
        """Reward of each response against its gold (str, or list[str] whose parts must all match).

        ``lengths`` are response lengths in tokens, needed by the overlong term. ``prompts``,
        ``data_sources`` and ``extra_infos`` are handed to user reward functions. ``shaped=False``
        leaves out the format and overlong terms: the verifier's own score (held-out accuracy).
        Shape: N responses -> N floats.
        """
        n = len(responses)
        columns = {"golds": golds, "lengths": lengths, "prompts": prompts}
        columns |= {"data_sources": data_sources, "extra_infos": extra_infos}
        for name, col in columns.items():
            if col is not None and len(col) != n:
                raise ValueError(f"score_batch: {name} has {len(col)} entries for {n} responses")
        if shaped and self.overlong is not None and lengths is None:
            raise ValueError("score_batch: lengths= (response tokens) is required when overlong is set")
        texts = [_as_text(r) for r in responses]
        gold_list = [_as_gold(g) for g in golds]
        if self.reward == "math":
            # the whole gold only: parts are parsed (in the item) only if the one-set comparison fails
            keys = (parse_keys(g, None)[0] for g in gold_list)
            self._parse_once(keys, self.gold_timeout, "reward/gold_timeouts")
        tasks: list[_Task | None] = []
        for i, (text, gold) in enumerate(zip(texts, gold_list)):
            if self.reward == "math" and (self.strict or has_box(text)):
                # the boxed answer is read here, so the worker only compares two answer strings
                pred = final_answer(text, len(gold_parts(gold)), strict=self.strict)
                tasks.append(self._verify_task(gold, pred))
                continue
            kwargs: dict[str, Any] = {"strict": self.strict}
            for key, col in (("prompt", prompts), ("data_source", data_sources), ("extra_info", extra_infos)):
                if col is not None:
                    kwargs[key] = col[i]
            tasks.append(_Task("score", (text, gold), kwargs, parse_keys(gold, None)))
        scores = self._run_items(tasks)
        if not shaped:
            return scores
        if self.format_weight:
            scores = [s + self.format_weight * format_term(t, self.reward) for s, t in zip(scores, texts)]
        if self.overlong is not None:
            o = self.overlong
            scores = [
                s + o.factor * overlong_penalty(int(n_tok), o.max_len, o.cache_len)
                for s, n_tok in zip(scores, lengths)  # type: ignore[arg-type]
            ]
        return scores

    def verify_pairs(self, pairs: Sequence[tuple[Gold, str | None]]) -> list[bool]:
        """Is each extracted answer ``pred`` equal to ``gold``? (maj@k grouping; same time limits.)

        Gold first, as math-verify requires; ``None`` predictions are unequal to everything. Each
        distinct answer string is parsed once up front and its pairs go to the worker holding it.
        """
        items = [(_as_gold(g), None if p is None else _as_text(p)) for g, p in pairs]
        if self.reward != "dapo":
            keys = (k for g, p in items if p is not None for k in parse_keys(g, p)[:2])
            self._parse_once(keys, self.timeout, "reward/timeouts")
        tasks = [self._verify_task(g, p) for g, p in items]
        return [v == 1.0 for v in self._run_items(tasks)]

    def _verify_task(self, gold: str | list[str], pred: str | None) -> _Task | None:
        """The task comparing two answer strings; None (0.0, no worker time) when there is nothing
        to compare: no answer, an over-long one, or a side whose parse already overran its limit."""
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            return None
        keys = parse_keys(gold, pred)
        if self._unparsable.intersection(keys[:2]):
            return None
        return _Task("verify", (gold, pred), {}, keys)


def _next_item(queues: list[collections.deque], slot: int) -> int | None:
    """The next item for worker ``slot``: its own queue first, else steal from the longest queue's
    tail (the items its owner would reach last)."""
    if queues[slot]:
        return queues[slot].popleft()
    longest = max(queues, key=len)
    return longest.pop() if longest else None
