"""Shared benchmark helpers: fresh-subprocess runs, peak memory, timing, machine text, markdown.

Memory is the peak above the process baseline:
- CPU: peak resident set size. Before each timed run we reset the kernel's high-water
  mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and read ``VmHWM`` after it;
  the baseline is ``VmRSS`` once the inputs exist, before the first run. Anything a
  previous run left resident counts against the variant (conservative).
- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the start.

Time is the median wall time of ``repeats`` runs after one warm-up run. We also record the
median process CPU time (user + system, all threads): on a shared machine other jobs inflate
wall time but hardly the CPU time a run itself consumes.

Each variant runs in its own interpreter (``run_worker``) so allocator caches, MKL
buffers and page-cache state of one variant never flatter or burden another.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

WORKER_FLAG = "--worker"


# --- memory ---------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak_rss_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def measure(fn: Callable[[], None], *, repeats: int, device: str, warmup: int = 1) -> dict:
    """Median time (s) of ``repeats`` calls of ``fn`` and the peak memory above baseline (bytes)."""
    import gc

    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    peaks, times, cpu = [], [], []
    for i in range(warmup + repeats):
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
        if i >= warmup:
            times.append(dt)
            cpu.append(dc)
        peaks.append(peak)  # the warm-up run counts for memory: it is a real run too
    return {
        "median_s": statistics.median(times), "times_s": times, "cpu_median_s": statistics.median(cpu),
        "peak_bytes": max(peaks), "load_avg": os.getloadavg()[0],
    }


# --- subprocess -----------------------------------------------------------------------------


def run_worker(script: str, spec: dict, timeout: float | None = None) -> dict:
    """Run ``script --worker <json spec>`` in a fresh interpreter; return its last stdout line as JSON."""
    cmd = [sys.executable, script, WORKER_FLAG, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {**spec, "error": f"{why}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_spec(argv: Sequence[str]) -> dict | None:
    """The JSON spec when this process was started by ``run_worker``, else None."""
    if len(argv) >= 3 and argv[1] == WORKER_FLAG:
        return json.loads(argv[2])
    return None


# --- reporting ------------------------------------------------------------------------------


def machine_description(device: str = "cpu") -> str:
    """One paragraph: CPU model and count (lscpu / nproc), memory, load, torch version, GPU."""
    import torch

    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, check=False, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - description only
            return "?"

    model = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (
        f"{model}; `nproc` = {sh('nproc')}; {mem_gib:.1f} GiB RAM; load average at start {load}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); Python {platform.python_version()}"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- grids of `stapo train` runs ------------------------------------------------------------


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] when there is none)."""
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_training(cmd: Sequence[str], run_dir, log, threads: int, cwd) -> float:
    """One ``stapo train`` subprocess with its output in ``log``; returns its wall seconds.

    An unfinished ``run_dir`` left by an earlier invocation is removed first, so a grid can be
    re-run after an interruption and only the missing runs start again.
    """
    import shutil
    from pathlib import Path

    if Path(run_dir).exists():
        shutil.rmtree(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def mean_sd(values: Sequence[float], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    """'mean ± sample SD' of ``values × scale`` ('-' when empty)."""
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{fmt.format(m)} ± {fmt.format(sd)}"


def run_grid(launch: Callable[[object], dict], specs: Sequence, jobs: int) -> tuple[list[dict], float]:
    """``launch`` over ``specs`` with ``jobs`` at a time; returns the results in order and the wall seconds."""
    import concurrent.futures

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(launch, specs))
    return results, time.perf_counter() - t0


def write_report(out_dir, results: list[dict], text: str, markdown_path=None) -> None:
    """Save the raw results as ``out_dir/results.json``, print the report and write it to ``markdown_path``."""
    from pathlib import Path

    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    if markdown_path:
        Path(markdown_path).write_text(text + "\n")
