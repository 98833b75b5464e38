"""Benchmark 2 (issue 11): what the S2T mask and its entropy quantile cost on top of `justrl`.

Same inputs, three variants, each in a fresh subprocess; the timed step is
``stapo.objectives.policy_loss(name, ...)`` forward + backward, repeated ``--inner`` times
per run (a single call is milliseconds), median of ``--repeats`` runs:
  justrl          the baseline objective STAPO builds on
  stapo           justrl × S2T mask, τ_h = the candidates' entropy quantile of this batch
  stapo-minibatch the trainer's path: τ_h once via ``minibatch_overrides`` over the batch
                  (timed too), then ``policy_loss(..., entropy_threshold=τ_h)``

Inputs, B × T = N tokens (default 64 × 1024 = 64k): response lengths uniform in [T/4, T];
log π = −Exp(1.5) (so ≈1.6 % of tokens have π < τ_p = 0.002); old log π = log π + N(0, 0.05²);
entropy = Gamma(2, 0.5) nats; advantages N(0, 1) per sequence (half positive).

Run:  .venv/bin/python benchmarks/bench_loss_overhead.py --b 64 --t 1024
GPU:  python benchmarks/bench_loss_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import fmt_bytes, machine_description, markdown_table, measure, run_worker, worker_spec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
VARIANTS = ("justrl", "stapo", "stapo-minibatch")


def make_inputs(b: int, t: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T]
    logprobs = -torch.empty(b, t).exponential_(1 / 1.5, generator=g)  # mean 1.5 nats
    old = logprobs + 0.05 * torch.randn(b, t, generator=g)
    entropy = torch.distributions.Gamma(2.0, 2.0).sample((b, t))
    adv = torch.randn(b, generator=g)
    return [x.to(device) for x in (logprobs, old, adv, mask, entropy)]


def worker(spec: dict) -> dict:
    import torch

    from stapo.objectives import TokenStats, minibatch_overrides, policy_loss

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    lp0, old, adv, mask, ent = make_inputs(spec["b"], spec["t"], spec["device"])
    lp = lp0.clone().requires_grad_()
    name = spec["variant"]

    def one():
        overrides = {}
        if name == "stapo-minibatch":
            overrides = minibatch_overrides("stapo", [TokenStats(lp.detach(), ent, adv, mask)])
        loss, _ = policy_loss("stapo" if name.startswith("stapo") else "justrl", lp, old, adv, mask,
                              entropy=ent, **overrides)
        loss.backward()
        lp.grad = None

    def step():
        for _ in range(spec["inner"]):
            one()

    res = measure(step, repeats=spec["repeats"], device=spec["device"])
    return {**spec, **res, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--b", type=int, default=64)
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--inner", type=int, default=20, help="loss calls per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    print(f"Machine: {machine_description(args.device)}\n")
    print("Command: `.venv/bin/python " + " ".join([str(HERE.relative_to(ROOT))] + sys.argv[1:]) + "`\n")
    results = []
    for variant in VARIANTS:
        spec = {"variant": variant, "b": args.b, "t": args.t, "device": args.device, "inner": args.inner,
                "repeats": args.repeats, "threads": args.threads}
        r = run_worker(str(HERE), spec)
        results.append(r)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(r) + "\n")
    base = results[0]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "-", "-", "-", "-", "-", r["error"][:80]])
            continue
        per_call = 1e3 / args.inner
        rows.append([
            r["variant"], f"{r['median_s'] * per_call:.2f}", f"{r['median_s'] / base['median_s']:.3f}",
            f"{r['cpu_median_s'] * per_call:.2f}", f"{r['cpu_median_s'] / base['cpu_median_s']:.3f}",
            fmt_bytes(r["peak_bytes"]), f"{r['load_avg']:.1f}",
        ])
    threads = args.threads or "default"
    print(f"N = {args.b} × {args.t} = {args.b * args.t} tokens on {args.device} ({threads} threads); per loss call (forward + "
          f"backward), median of {args.repeats} runs of {args.inner} calls\n")
    print(markdown_table(
        ["variant", "wall (ms)", "wall / justrl", "CPU (ms)", "CPU / justrl", "peak memory", "load"], rows
    ))
    return 0


if __name__ == "__main__":
    spec = worker_spec(sys.argv)
    if spec is not None:
        sys.path.insert(0, str(ROOT / "src"))
        print(json.dumps(worker(spec)))
    else:
        raise SystemExit(main())
