"""A module's independent subprocess scenarios, two at a time.

Each scenario runs single-threaded `stapo` processes (threads=1), so the serial suite would leave one
of a 2-core machine's cores idle. `prefetch` starts the scenarios of the selected tests (all of them
in `make test`, fewer under -k) in a pool of two; each test waits for its own and asserts on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


def workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def prefetch(request, scenario_for: Callable) -> tuple[ThreadPoolExecutor, dict[str, Future]]:
    """Submit ``scenario_for(item)`` (a no-argument callable, or None) for every selected test of
    ``request``'s module, in collection order; the futures by test name."""
    items = [i for i in request.session.items if i.module is request.module]
    pool = ThreadPoolExecutor(max_workers=workers())
    futures = {}
    for item in items:
        job = scenario_for(item)
        if job is not None:
            futures[item.name] = pool.submit(job)
    return pool, futures
