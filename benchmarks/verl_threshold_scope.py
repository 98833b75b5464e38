"""How far each τ_h scope a verl integration could use is from stapo's mini-batch-wide S2T mask.

Reads the per-token rollout dumps of a `stapo train` run (diagnostics.dump_every, one parquet per
dumped step: logprob, entropy, advantage, valid per response token of the rollout policy) and, for
every optimizer mini-batch of each dumped step, compares with stapo's mask (`s2t_mask` over the
mini-batch):

- verl hook (stapo.integrations.verl): τ_h and denominator from ``minibatch_statistics`` over the
  mini-batch, the mask applied per micro-batch, as the hook does;
- micro-batch scope: τ_h of each micro-batch alone (what a loss without the pre-pass sees);
- rank scope: τ_h of each DP rank's share alone (micro-batch scope all-gathered within a rank only);
- step scope: τ_h over the whole step, from the rollout policy (exact statistics only on the first
  mini-batch; this isolates the scope effect).

Run in the verl environment (it calls the integration's own function):
    .venv-verl/bin/python benchmarks/verl_threshold_scope.py RUN_DIR --mini-batch 32 --micro-batch 8 --ranks 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def load_step(path: Path):
    """[B, T] logprob, entropy, advantage, valid of one dump, rows = the batch's sequences in order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    d = table.to_pydict()
    meta = json.loads(table.schema.metadata[b"stapo"])
    seq, pos = torch.tensor(d["seq"]), torch.tensor(d["pos"])
    shape = (int(seq.max()) + 1, int(pos.max()) + 1)
    out = {}
    for name in ("logprob", "entropy", "advantage"):
        x = torch.zeros(shape, dtype=torch.float64)
        x[seq, pos] = torch.tensor([float("nan") if v is None else v for v in d[name]], dtype=torch.float64)
        out[name] = torch.nan_to_num(x)
    valid = torch.zeros(shape, dtype=torch.bool)
    valid[seq, pos] = torch.tensor(d["valid"])
    out["valid"] = valid
    return out, meta


def compare(run_dir: Path, mini: int, micro: int, ranks: int, tau_p: float, q: float) -> dict:
    from stapo.diagnostics import list_dumps
    from stapo.integrations.verl import minibatch_statistics
    from stapo.objectives import s2t_mask, s2t_threshold

    opts = {"prob_threshold": tau_p, "entropy_quantile": q, "loss_agg_mode": "token-mean", "clip_low": 0.2,
            "clip_high": 0.28, "clip_ratio_c": 10.0}
    totals = {"valid": 0, "stapo_silenced": 0, "verl_hook": 0, "micro_batch": 0, "rank": 0, "step": 0,
              "denominator_mismatch": 0, "mini_batches": 0}
    dumps = list_dumps(run_dir)
    if not dumps:
        raise SystemExit(f"{run_dir}: no rollouts/step_*.parquet (train with diagnostics.dump_every=1)")
    for _, path in dumps:
        x, _ = load_step(path)
        quad = (x["logprob"], x["entropy"], x["advantage"], x["valid"])
        tau_step = s2t_threshold([quad], tau_p, q)
        for start in range(0, len(x["valid"]), mini):
            rows = slice(start, start + mini)
            lp, ent, adv, valid = (t[rows] for t in quad)
            want = s2t_mask(lp, ent, adv, valid, tau_p, q)  # stapo: τ_h over the mini-batch
            hook = minibatch_statistics("stapo", opts, lp, ent, adv, valid)
            tau = hook.overrides["entropy_threshold"]

            def split_mask(size, threshold=None, lp=lp, ent=ent, adv=adv, valid=valid):
                return torch.cat([s2t_mask(lp[i:i + size], ent[i:i + size], adv[i:i + size], valid[i:i + size],
                                           tau_p, q, entropy_threshold=threshold) for i in range(0, len(lp), size)])

            kept = int((valid & ~want).sum())
            totals["denominator_mismatch"] += abs(int(hook.denominator) - kept)
            totals["verl_hook"] += int((split_mask(micro, tau) ^ want).sum())
            totals["micro_batch"] += int((split_mask(micro) ^ want).sum())
            totals["rank"] += int((split_mask(mini // ranks) ^ want).sum())
            totals["step"] += int((s2t_mask(lp, ent, adv, valid, tau_p, q, entropy_threshold=tau_step) ^ want).sum())
            totals["valid"] += int(valid.sum())
            totals["stapo_silenced"] += int(want.sum())
            totals["mini_batches"] += 1
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--mini-batch", type=int, default=32, help="sequences per optimizer mini-batch (M × n)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--ranks", type=int, default=2, help="DP ranks sharing a mini-batch")
    p.add_argument("--tau-p", type=float, default=0.002)
    p.add_argument("--entropy-quantile", type=float, default=0.75)
    args = p.parse_args()
    t = compare(args.run_dir, args.mini_batch, args.micro_batch, args.ranks, args.tau_p, args.entropy_quantile)
    print(f"{t['mini_batches']} mini-batches, {t['valid']} valid tokens, {t['stapo_silenced']} silenced by stapo's "
          f"mini-batch mask; kept-token denominator mismatches (verl hook): {t['denominator_mismatch']}")
    print("| scope | tokens whose S2T decision differs | % of valid tokens | % of stapo's silenced |")
    print("|---|---|---|---|")
    for key, label in (("verl_hook", "mini-batch (stapo.integrations.verl hook)"),
                       ("micro_batch", f"micro-batch ({args.micro_batch} sequences)"),
                       ("rank", f"DP rank ({args.mini_batch // args.ranks} sequences)"),
                       ("step", "whole step, rollout-policy statistics")):
        n = t[key]
        print(f"| {label} | {n} | {100 * n / max(t['valid'], 1):.3f} | {100 * n / max(t['stapo_silenced'], 1):.1f} |")


if __name__ == "__main__":
    main()
