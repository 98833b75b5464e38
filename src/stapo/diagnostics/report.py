"""``stapo analyze``'s report: Markdown with PNGs from a run's metrics.jsonl and rollout dumps.

Inputs (RUN_DIR): ``metrics.jsonl`` (one JSON object per step with ``step`` and flat metric keys,
``diag/*`` from ``stapo.diagnostics.metrics``), ``rollouts/step_*.parquet`` (``dumps``), and
optionally ``config.yaml``. Output (default ``RUN_DIR/analysis``): ``report.md`` and

    scatter_p_h.png         p–H scatter of the first and last dump, log-p axis, coloured by quadrant,
                            silenced tokens marked, thresholds and the p = e^{−H} curve drawn
    quadrants.png           quadrant fractions over training; silenced fraction and gradient share
    grad_norm_hist.png      ‖∇_z J‖ histograms per quadrant (all dumps)
    entropy.png             entropy over training with the predicted entropy-up fractions overlaid

Nothing but the "Tokens the objective acts on" section depends on the objective: the silenced
columns of a GRPO run are what S2T would have silenced; that section shows ``select/*``, the tokens
a selecting objective (stapo, entropy20, clip_cov, kl_cov) acted on. Plots use matplotlib's object API with the Agg canvas (no display, no global state).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..objectives.masks import TAU_P
from .cli import NO_DUMPS
from .dumps import list_dumps, read_rollouts
from .metrics import QUADRANTS, finalize_selection, selection_sums

__all__ = ["dump_selection", "load_metrics", "low_p_share", "top_silenced_tokens", "write_report"]

COLORS = {"low_p_low_h": "#d62728", "low_p_high_h": "#ff7f0e", "high_p_low_h": "#1f77b4", "high_p_high_h": "#2ca02c"}
LABELS = {
    "low_p_low_h": "low p, low H (spurious)",
    "low_p_high_h": "low p, high H (exploratory)",
    "high_p_low_h": "high p, low H (confident)",
    "high_p_high_h": "high p, high H",
}


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``; a truncated last line (a run still writing) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a stapo run directory?")
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break  # the trainer is mid-write
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'step' key")
        rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, nrows: int = 1):
    """A pyplot-free Figure on the Agg canvas and its axes (row-major)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return path.name


def plot_quadrants(rows: list[dict], path: Path) -> str | None:
    """Quadrant fractions over training; silenced fraction and gradient shares beside them."""
    series = {q: _series(rows, f"diag/quadrant/{q}/fraction") for q in QUADRANTS}
    if not any(len(s) for s, _ in series.values()):
        return None
    fig, (ax, ax2) = _figure(2)
    for q, (s, v) in series.items():
        ax.plot(s, v, marker=".", color=COLORS[q], label=LABELS[q])
    ax.set(xlabel="step", ylabel="fraction of A > 0 tokens", title="Quadrants of positive-advantage tokens")
    ax.legend(fontsize=8)
    for key, label in [("diag/silenced/fraction", "silenced / valid tokens"),
                       ("diag/silenced/grad_sq_share", "silenced share of Σ‖∇_z J‖²"),
                       ("diag/silenced/grad_norm_share", "silenced share of Σ‖∇_z J‖")]:
        s, v = _series(rows, key)
        if len(s):
            ax2.plot(s, v, marker=".", label=label)
    ax2.set(xlabel="step", ylabel="fraction", title="What S2T silences (before silencing)")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_entropy(rows: list[dict], path: Path) -> str | None:
    """Mean token entropy over training, predicted entropy-up fractions on a second axis."""
    key = "actor/entropy" if len(_series(rows, "actor/entropy")[0]) else "diag/entropy/mean"
    s, v = _series(rows, key)
    if not len(s):
        return None
    fig, (ax,) = _figure(1, 7.0)
    ax.plot(s, v, color="black", marker=".", label=f"entropy ({key})")
    ax.set(xlabel="step", ylabel="mean token entropy (nats)", title="Entropy and the predicted entropy-up share")
    twin = ax.twinx()
    for k, label, style in [("diag/entropy_up/paper_fraction", "predicted up: p < e^(−H) (paper)", "--"),
                            ("diag/entropy_up/exact_fraction", "predicted up: exact first order", ":")]:
        s2, v2 = _series(rows, k)
        if len(s2):
            twin.plot(s2, v2, linestyle=style, marker=".", label=label)
    twin.set_ylabel("fraction of A > 0 tokens")
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    return _save(fig, path)


def _dump_meta(table) -> dict:
    meta = (table.schema.metadata or {}).get(b"stapo")
    return json.loads(meta) if meta else {}


def plot_scatter(run_dir: Path, path: Path, max_points: int = 20000, seed: int = 0) -> str | None:
    """p (log axis) against H for the first and the last dump."""
    dumps = list_dumps(run_dir)
    if not dumps:
        return None
    chosen = [dumps[0]] if len(dumps) == 1 else [dumps[0], dumps[-1]]
    fig, axes = _figure(len(chosen), 6.0, 4.5)
    rng = np.random.default_rng(seed)
    for ax, (step, file) in zip(axes, chosen):
        table = read_rollouts(file)
        meta = _dump_meta(table)
        d = table.select(["p", "entropy", "quadrant", "silenced", "valid"]).to_pydict()
        p = np.clip(np.asarray(d["p"], dtype=float), 1e-12, 1.0)  # float32 p may underflow to 0
        h = np.asarray(d["entropy"], dtype=float)
        quad = np.asarray([q or "" for q in d["quadrant"]])
        sil = np.asarray(d["silenced"], dtype=bool)
        idx = np.arange(len(p))
        if len(idx) > max_points:  # keep every silenced token, subsample the rest
            rest = rng.choice(idx[~sil], size=max(0, max_points - int(sil.sum())), replace=False)
            idx = np.sort(np.concatenate([idx[sil], rest]))
        other = idx[quad[idx] == ""]
        ax.scatter(p[other], h[other], s=4, color="0.75", label="A ≤ 0 or masked", rasterized=True)
        for q in QUADRANTS:
            sel = idx[quad[idx] == q]
            ax.scatter(p[sel], h[sel], s=6, color=COLORS[q], label=f"{LABELS[q]} ({len(sel)})", rasterized=True)
        sel = idx[sil[idx]]
        ax.scatter(p[sel], h[sel], s=22, marker="x", color="black", linewidths=0.8,
                   label=f"silenced by S2T ({len(sel)})")
        hs = np.linspace(0.0, max(float(h.max()) if len(h) else 1.0, 1e-3), 200)
        ax.plot(np.exp(-hs), hs, color="purple", linewidth=1, label="p = e^(−H): entropy up to the left")
        if "prob_threshold" in meta:
            ax.axvline(meta["prob_threshold"], color="0.3", linestyle="--", linewidth=0.8, label="τ_p")
        tau = meta.get("entropy_threshold")
        if isinstance(tau, float) and math.isfinite(tau):
            ax.axhline(tau, color="0.3", linestyle=":", linewidth=0.8, label=f"τ_h = {tau:.3g}")
        ax.set_xscale("log")
        ax.set(xlabel="p (current policy, log scale)", ylabel="entropy H (nats)", title=f"step {step}")
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_grad_norm_hist(table, path: Path) -> str | None:
    """Histograms of log10 ‖∇_z J‖ per quadrant; clipped tokens (w = 0) are counted in the legend."""
    d = table.select(["quadrant", "grad_norm"]).to_pydict()
    quad = np.asarray([q or "" for q in d["quadrant"]])
    g = np.asarray(d["grad_norm"], dtype=float)
    pos = g > 0
    if not (pos & (quad != "")).any():
        return None
    bins = np.linspace(np.log10(g[pos].min()), np.log10(g[pos].max()) + 1e-9, 40)
    fig, axes = _figure(2, 5.0, 3.4, nrows=2)
    for ax, q in zip(axes, QUADRANTS):
        sel = quad == q
        zero = int((sel & ~pos).sum())
        ax.hist(np.log10(g[sel & pos]), bins=bins, color=COLORS[q])
        ax.set(title=f"{LABELS[q]}: {int(sel.sum())} tokens, {zero} clipped (w = 0)", xlabel="log10 ‖∇_z J‖",
               ylabel="tokens")
        ax.title.set_fontsize(9)
    return _save(fig, path)


def top_silenced_tokens(table, k: int = 20, n_examples: int = 2, before: int = 8, after: int = 4) -> list[dict]:
    """The ``k`` most often silenced token ids with their text, rates and ``n_examples`` contexts.

    Each entry: token_id, piece, count (times silenced), share (of all silenced tokens),
    rate (silenced / occurrences of the id as a valid token), examples (``before`` pieces, the
    token in ⟦ ⟧, ``after`` pieces, from its own response).
    """
    d = table.select(["step", "seq", "pos", "token_id", "piece", "silenced", "valid"]).to_pydict()
    texts: dict[tuple[int, int], dict[int, str]] = defaultdict(dict)
    for st, sq, ps, pc in zip(d["step"], d["seq"], d["pos"], d["piece"]):
        texts[(st, sq)][ps] = pc
    silenced = Counter()
    seen = Counter()
    where: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    pieces: dict[int, str] = {}
    for st, sq, ps, tid, pc, s, v in zip(d["step"], d["seq"], d["pos"], d["token_id"], d["piece"],
                                         d["silenced"], d["valid"]):
        if v:
            seen[tid] += 1
        if s:
            silenced[tid] += 1
            pieces[tid] = pc
            if len(where[tid]) < n_examples:
                where[tid].append((st, sq, ps))
    total = sum(silenced.values())
    out = []
    for tid, count in silenced.most_common(k):
        examples = []
        for st, sq, ps in where[tid]:
            row = texts[(st, sq)]
            left = "".join(row.get(i, "") for i in range(max(0, ps - before), ps))
            right = "".join(row.get(i, "") for i in range(ps + 1, ps + 1 + after))
            examples.append(f"…{left}⟦{row[ps]}⟧{right}…")
        out.append({"token_id": tid, "piece": pieces[tid], "count": count, "share": count / total,
                    "rate": count / max(seen[tid], 1), "examples": examples})
    return out


def low_p_share(table, prob_threshold: float | None = None) -> dict | None:
    """Where the low-probability (p < τ_p) tokens of the dumps fall: correct vs incorrect responses.

    A response is correct when its reward is > 0 (1 vs 0 for ``math``, +1 vs −1 for ``dapo``). Only
    low-p tokens inside correct responses can get A > 0 and become S2T candidates: a model that derails
    after an odd token has them all in incorrect responses, and S2T then silences nothing.
    ``prob_threshold`` defaults to the dump's own (its metadata), else S2T's τ_p. Keys: prob_threshold,
    tokens, low_p (count), in_correct / in_incorrect (low-p counts), share_in_correct (of the low-p
    tokens), rate_in_correct / rate_in_incorrect (low-p per token of such responses), of_all_in_correct
    (low-p inside correct responses per token, the quantity that bounds S2T's silenced fraction).
    None when the dumps have no valid token or no reward.
    """
    if prob_threshold is None:
        prob_threshold = _dump_meta(table).get("prob_threshold", TAU_P)
    d = table.select(["p", "reward", "valid"]).to_pydict()
    rows = [(p, r > 0) for p, r, v in zip(d["p"], d["reward"], d["valid"]) if v and r is not None and p is not None]
    if not rows:
        return None
    low = [ok for p, ok in rows if p < prob_threshold]
    n_correct = sum(ok for _, ok in rows)
    n_incorrect = len(rows) - n_correct
    in_correct = sum(low)
    return {
        "prob_threshold": prob_threshold,
        "tokens": len(rows),
        "low_p": len(low),
        "in_correct": in_correct,
        "in_incorrect": len(low) - in_correct,
        "share_in_correct": in_correct / len(low) if low else None,
        "rate_in_correct": in_correct / n_correct if n_correct else None,
        "rate_in_incorrect": (len(low) - in_correct) / n_incorrect if n_incorrect else None,
        "of_all_in_correct": in_correct / len(rows),
    }


def _low_p_section(share: dict | None) -> list[str]:
    if share is None:
        return ["No valid tokens with rewards in the dumps."]

    def fmt(x):
        return "–" if x is None else f"{x:.3g}"

    tau = share["prob_threshold"]
    return [
        (f"Tokens with p < τ_p = {tau:g} in the dumps: {share['low_p']} of {share['tokens']} "
        f"({fmt(share['low_p'] / share['tokens'])}); {share['in_correct']} inside correct responses "
        f"(share {fmt(share['share_in_correct'])}), {share['in_incorrect']} inside incorrect ones."),
        "",
        "| | correct responses | incorrect responses |",
        "|---|---|---|",
        f"| low-p tokens | {share['in_correct']} | {share['in_incorrect']} |",
        (f"| low-p rate (per token of such responses) | {fmt(share['rate_in_correct'])} | "
        f"{fmt(share['rate_in_incorrect'])} |"),
        "",
        (f"Low-p tokens inside correct responses per response token: **{fmt(share['of_all_in_correct'])}**. "
        "Only these can have A > 0, so this bounds the S2T candidate fraction (the STAPO paper silences "
        "~1e-4 of tokens). Near 0 over many low-p tokens means the policy derails after one, and S2T has "
        "nothing to silence."),
    ]


def dump_selection(table) -> dict[str, float] | None:
    """The ``select/*`` metrics (``finalize_selection``) of the dumps' ``selected`` tokens, by the same
    ``selection_sums`` as the trainer, over the dumps' own quadrants and S2T set; None if no dump has them."""
    import torch

    if "selected" not in table.column_names:
        return None
    d = table.select(["selected", "valid", "quadrant", "silenced"]).to_pydict()
    rows = [i for i, x in enumerate(d["selected"]) if x is not None]
    if not rows:
        return None
    code = {q: i for i, q in enumerate(QUADRANTS)}

    def column(name, fn=bool):
        return torch.tensor([fn(d[name][i]) for i in rows])

    sums = selection_sums(column("selected"), column("valid"), column("quadrant", lambda q: code.get(q, -1)),
                          column("silenced"))
    return finalize_selection(sums)


def _selection_section(rows: list[dict], table) -> list[str]:
    """What the objective acts on, from the latest ``select/*`` row of metrics.jsonl and from the dumps."""
    last = next((r for r in reversed(rows) if "select/count" in r), {})
    dumped = dump_selection(table) if table is not None else None
    if not last and dumped is None:
        return ["The objective selects no tokens (or the trainer logged no `select/*` metrics)."]
    action = (_dump_meta(table).get("action") if table is not None else None) or "selected"
    keys = (["select/count", "select/fraction"]
            + [f"select/quadrant/{q}/{k}" for q in QUADRANTS for k in ("count", "fraction")]
            + ["select/non_positive/count", "select/s2t/count", "select/s2t_overlap/count",
               "select/s2t_overlap/of_selected", "select/s2t_overlap/of_s2t"])

    def cell(src, key):
        return f"{src[key]:.4g}" if src and isinstance(src.get(key), (int, float)) else "–"

    step = f"step {last['step']}" if last else "no step"
    intro = (f"Tokens the objective acts on (**{action}**): their share of valid tokens, their p × H quadrants "
             "(the cuts above; `non_positive`: A ≤ 0, outside the quadrants) and their overlap with the set "
             "S2T silences at its settings on the same tokens (`of_selected`: share of this set; `of_s2t`: "
             "share of S2T's).")
    lines = [intro, "", f"| metric | metrics.jsonl ({step}) | all dumps |", "|---|---|---|"]
    lines += [f"| `{k}` | {cell(last, k)} | {cell(dumped, k)} |" for k in keys]
    return lines


def _md_text(s: str) -> str:
    """Text safe inside a Markdown table cell: escapes shown, pipes escaped, in a code span."""
    body = json.dumps(s, ensure_ascii=False)[1:-1].replace("|", "\\|")
    fence = "``" if "`" in body else "`"
    return f"{fence} {body} {fence}" if fence == "``" else f"`{body}`"


def _run_label(run_dir: Path) -> str:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return "unknown objective (no config.yaml)"
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{cfg}: not valid YAML ({err})") from None
    obj = data.get("objective") if isinstance(data, dict) else None
    name = obj.get("name") if isinstance(obj, dict) else obj
    return f"objective `{name}`" if name else "objective not named in config.yaml"


def _latest_summary(rows: list[dict]) -> list[str]:
    last = next((r for r in reversed(rows) if any(k.startswith("diag/") for k in r)), None)
    if last is None:
        return ["No `diag/*` metrics in metrics.jsonl: the trainer did not log token diagnostics."]
    keys = ["diag/pos_tokens"] + [f"diag/quadrant/{q}/fraction" for q in QUADRANTS] + [
        "diag/entropy_up/paper_fraction", "diag/entropy_up/exact_fraction", "diag/silenced/fraction",
        "diag/silenced/grad_sq_share", "diag/silenced/grad_norm_share", "diag/entropy_threshold",
        "diag/bounds/violations"]
    lines = [f"Latest step with diagnostics: {last['step']}.", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {last[k]:.4g} |" for k in keys if isinstance(last.get(k), (int, float))]
    return lines


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    theory: dict | None = None,
    top_k: int = 20,
    max_points: int = 20000,
    seed: int = 0,
    say=None,
) -> Path:
    """Write ``report.md`` and its PNGs to ``out_dir`` (default ``RUN_DIR/analysis``); returns report.md.

    ``theory``: the dict of ``stapo.diagnostics.theory_check``, shown as its own section when given.
    ``say``: told each phase (``stapo.progress.Reporter.phase``).
    """
    say = say or (lambda _text: None)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    say(f"reading {run_dir / 'metrics.jsonl'} and the rollout dumps")
    rows = load_metrics(run_dir)
    dumps = list_dumps(run_dir)
    table = read_rollouts(run_dir) if dumps else None
    say(f"plotting {len(rows)} logged steps and {len(dumps)} dumps into {out}")

    md = [f"# Token diagnostics: {run_dir.name}", "",
          f"{_run_label(run_dir)}; {len(rows)} logged steps; {len(dumps)} rollout dumps.", ""]
    md += ["## Summary", ""] + _latest_summary(rows) + [""]

    def image(title, name, why):
        md.extend([f"## {title}", "", why, ""])
        md.extend([f"![{title}]({name})", ""] if name else ["(no data for this plot)", ""])

    image("Probability–entropy scatter", plot_scatter(run_dir, out / "scatter_p_h.png", max_points, seed),
          "Every response token of the first and last dump. Positive-advantage tokens are coloured by "
          "quadrant; × marks tokens S2T silences. Left of the purple curve (p < e^(−H)) a positive update "
          "raises the entropy (the paper's criterion).")
    image("Quadrants over training", plot_quadrants(rows, out / "quadrants.png"),
          "Growth of the low-p, low-H quadrant and of its gradient share is the paper's warning sign.")
    image("Gradient norm per quadrant",
          plot_grad_norm_hist(table, out / "grad_norm_hist.png") if table is not None else None,
          "Exact ‖∇_z J‖ = |w| √(1 − 2p + Σπ²) of positive-advantage tokens over all dumps.")
    image("Entropy over training", plot_entropy(rows, out / "entropy.png"),
          "Mean token entropy with the fraction of positive-advantage tokens predicted to raise it.")

    md += ["## Tokens the objective acts on", ""] + _selection_section(rows, table) + [""]
    md += ["## Low-probability tokens in correct vs incorrect responses", ""]
    md += (_low_p_section(low_p_share(table)) if table is not None else [f"No rollout dumps ({NO_DUMPS})."]) + [""]
    md += ["## Top silenced tokens", ""]
    top = top_silenced_tokens(table, top_k) if table is not None else []
    if not top:
        md += ["No token was silenced in the dumps." if table is not None else f"No rollout dumps ({NO_DUMPS}).", ""]
    else:
        md += ["| token | id | times silenced | share of silenced | silenced rate | example contexts |",
               "|---|---|---|---|---|---|"]
        for t in top:
            ex = "<br>".join(_md_text(e) for e in t["examples"])
            md.append(f"| {_md_text(t['piece'])} | {t['token_id']} | {t['count']} | {t['share']:.1%} | "
                      f"{t['rate']:.1%} | {ex} |")
        md.append("")
    if theory is not None:
        md += ["## Theory check on this model", "", theory["markdown"], ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
