"""PNG curves of a run (`stapo plot RUN_DIR`; also drawn at the end of training)."""

from __future__ import annotations

from pathlib import Path

PANELS = [
    ("reward/mean", "reward"),
    ("eval/accuracy", "held-out accuracy"),
    ("actor/entropy", "entropy"),
    ("response/length_mean", "response length"),
    ("s2t/masked_fraction", "S2T masked fraction"),
    ("s2t/entropy_threshold", "S2T τ_h"),
    ("actor/clip_frac_high", "clip fraction (high)"),
    ("actor/grad_norm", "grad norm"),
    ("diag/quadrant/low_p_low_h/fraction", "low-p low-H share of A>0 tokens"),
    ("diag/silenced/grad_norm_share", "grad-norm share of S2T tokens"),
    ("diag/entropy_up/paper_fraction", "A>0 tokens predicted to raise H"),
    ("diag/grad_norm/low_p_low_h/max", "max logit-grad norm, low-p low-H"),
]


def plot_run(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/plots/curves.png`` (one panel per metric present) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logger import read_metrics

    rows = read_metrics(run_dir)
    panels = [(k, t) for k, t in PANELS if any(r.get(k) is not None for r in rows)]
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    cols = 4
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw the curves of a training run as PNG")
    p.add_argument("run_dir")
    p.set_defaults(func=lambda args: print(plot_run(args.run_dir)) or 0)
