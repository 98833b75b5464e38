"""Figures: one bar chart per benchmark (pass@k and maj@k against k, avg@N marked), and
accuracy against training step for a run's checkpoints."""

from __future__ import annotations

from pathlib import Path

from .report import DISPLAY


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_benchmark(name: str, metrics: dict, path: str | Path, title_prefix: str = "") -> Path:
    """Bars of pass@k and maj@k at each reported k, and a dashed line at avg@N, all in %."""
    plt = _pyplot()
    ks = list(metrics["pass_at_k"])
    x = range(len(ks))
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(ks), 3.6))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [100 * metrics["pass_at_k"][k] for k in ks], w, label="pass@k")
    if metrics.get("maj_at_k"):
        ax.bar([i + w / 2 for i in x], [100 * metrics["maj_at_k"].get(k, 0.0) for k in ks], w, label="maj@k")
    avg, se = 100 * metrics["avg"], 100 * metrics["avg_stderr"]
    ax.axhline(
        avg,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"avg@{metrics['n_samples']} {avg:.1f}±{se:.1f}",
    )
    ax.set_xticks(list(x), ks)
    ax.set_xlabel("k")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title_prefix}{DISPLAY.get(name, name)} ({metrics['n_problems']} problems)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_benchmarks(results: dict, out_dir: str | Path) -> list[Path]:
    """``out_dir/plot_<benchmark>.png`` for every benchmark in ``results``."""
    return [plot_benchmark(b, m, Path(out_dir) / f"plot_{b}.png") for b, m in results["benchmarks"].items()]


def plot_accuracy_vs_step(steps: list[tuple[int, dict]], path: str | Path) -> Path:
    """avg@N (%) of each benchmark and the macro average against training step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [s for s, _ in steps]
    benches: list[str] = []
    for _, res in steps:
        benches += [b for b in res["benchmarks"] if b not in benches]
    for b in benches:
        pts = [(s, 100 * r["benchmarks"][b]["avg"]) for s, r in steps if b in r["benchmarks"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1, label=DISPLAY.get(b, b))
    ax.plot(
        xs,
        [100 * r["macro"]["avg"] for _, r in steps],
        color="black",
        linewidth=2.5,
        marker="s",
        label="Avg.",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("avg@N (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
