"""Benchmark 1 (issue 11): per-token log-prob + entropy, forward and backward, four ways.

Variants (each in a fresh subprocess, same seeded inputs):
  naive        stapo.ops.naive_token_stats: fp32 logits [N, V], log_softmax, gather, entropy
  trl-logits   TRL's logits path: logits = hidden @ W.T (model dtype), / τ, then
               trl.trainer.utils.selective_log_softmax (with gradient) and
               trl.trainer.utils.entropy_from_logits under no_grad, as TRL's trainers did
               before 1.16 (logits viewed as [N/1024, 1024, V], one row per sequence)
  trl-chunked  TRL 1.16's fused LM head, trl.kernels.ChunkedLogProbFunction (what
               ``add_fused_lm_head`` runs), outputs=("log_probs", "entropy")
  stapo        stapo.ops.token_stats (chunked over rows; backward recomputes logits)

The timed step is forward + backward of sum(g ⊙ logprobs) with a fixed random g [N] (the
policy-gradient weights); entropy is computed and detached (TRL computes it without
gradient too). Hidden [N, H] and W [V, H] both require grad unless --frozen-head (then
only hidden does: the LoRA / frozen-head case).

Run (the recorded results; see RESULTS_token_stats.md):
  .venv/bin/python benchmarks/bench_token_stats.py --n 1024 4096 16384 --vocab 32768 --hidden 1024
  .venv/bin/python benchmarks/bench_token_stats.py --n 4096 --vocab 151936 --hidden 1024
  .venv/bin/python benchmarks/bench_token_stats.py --n 4096 --frozen-head
  .venv/bin/python benchmarks/bench_token_stats.py --n 4096 --variants stapo --chunk-sizes 256 512 1024 2048
GPU (scripts/gpu_check.sh runs naive and stapo at these sizes; add --tf32 or --frozen-head by hand):
  python benchmarks/bench_token_stats.py --device cuda --dtype bfloat16 --vocab 151936 --hidden 2048 --n 8192 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import fmt_bytes, machine_description, markdown_table, measure, run_worker, worker_spec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
VARIANTS = ("naive", "trl-logits", "trl-chunked", "stapo")
TRL_ROWS = 1024  # trl-logits: tokens per "sequence" in the [B, T, V] view its functions loop over


def _variant_fn(name: str, chunk_size: int, temperature: float, compile_chunks: bool):
    """fn(hidden, weight, targets) -> (logprobs [N], entropy [N]) for variant ``name``."""
    import torch

    if name == "naive":
        from stapo.ops import naive_token_stats

        return lambda h, w, t: naive_token_stats(h, w, t, temperature=temperature)[:2]
    if name == "stapo":
        from stapo.ops import token_stats

        return lambda h, w, t: token_stats(
            h, w, t, temperature=temperature, chunk_size=chunk_size, compile=compile_chunks
        )[:2]
    if name == "trl-logits":
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        def trl_logits(h, w, t):
            n = h.shape[0]
            logits = torch.nn.functional.linear(h, w).view(-1, min(TRL_ROWS, n), w.shape[0])  # [B, T, V]
            logits = logits / temperature  # as GRPOTrainer did before calling selective_log_softmax
            logps = selective_log_softmax(logits, t.view(logits.shape[:2]))
            with torch.no_grad():
                ent = entropy_from_logits(logits)
            return logps.reshape(n), ent.reshape(n)

        return trl_logits
    if name == "trl-chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def trl_chunked(h, w, t):
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                h, w, None, t, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy")
            )
            return lp, ent.detach()

        return trl_chunked
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def worker(spec: dict) -> dict:
    """Runs inside the fresh subprocess: build inputs, time forward+backward, report peak memory."""
    import torch

    torch.manual_seed(0)
    dev, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
    n, h_dim, v = spec["n"], spec["hidden"], spec["vocab"]
    # logits with std ≈ 2 (a realistic spread for an LM head)
    hidden = torch.randn(n, h_dim, device=dev).to(dtype).requires_grad_()
    weight = (torch.randn(v, h_dim, device=dev) * (2.0 / h_dim**0.5)).to(dtype)
    weight.requires_grad_(not spec["frozen_head"])
    targets = torch.randint(0, v, (n,), device=dev)
    g = torch.randn(n, device=dev)
    fn = _variant_fn(spec["variant"], spec["chunk_size"], spec["temperature"], spec["compile"])

    def step():
        lp, ent = fn(hidden, weight, targets)
        (lp.float() * g).sum().backward()
        assert ent is not None and not ent.requires_grad
        hidden.grad = None
        weight.grad = None

    res = measure(step, repeats=spec["repeats"], device=dev)
    return {**spec, **res, "torch_threads": torch.get_num_threads()}


RATIO_HEADER = ["N", "variant", "wall (s)", "wall / naive", "CPU (s)", "CPU / naive", "peak memory",
                "memory / naive", "load"]


def combine_rounds(rounds: list[dict]) -> dict:
    """One result per variant: medians over rounds of the per-round medians, the largest peak."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    out = dict(ok[0])
    for key in ("median_s", "cpu_median_s"):
        out[key] = statistics.median(r[key] for r in ok)
    out["peak_bytes"] = max(r["peak_bytes"] for r in ok)
    out["load_avg"] = statistics.mean(r["load_avg"] for r in ok)
    return out


def ratio_rows(n, results):
    """Table rows for one size; ratios against the naive run of the same invocation."""
    base = next((r for r in results if r["variant"] == "naive" and "error" not in r), None)

    def ratio(r, key):
        return f"{r[key] / base[key]:.3f}" if base else "-"

    rows = []
    for r in results:
        label = r["variant"] + (f" (chunk {r['chunk_size']})" if r["variant"] == "stapo" else "")
        if "error" in r:
            rows.append([n, label, "-", "-", "-", "-", "-", "-", r["error"][:80]])
            continue
        rows.append([
            n, label, f"{r['median_s']:.2f}", ratio(r, "median_s"), f"{r['cpu_median_s']:.2f}",
            ratio(r, "cpu_median_s"), fmt_bytes(r["peak_bytes"]), ratio(r, "peak_bytes"), f"{r['load_avg']:.1f}",
        ])
    return rows


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from stapo.ops import DEFAULT_CHUNK_SIZE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE],
                    help="stapo chunk sizes to run (default: stapo.ops.DEFAULT_CHUNK_SIZE)")
    ap.add_argument("--frozen-head", action="store_true", help="W does not require grad (LoRA / frozen head)")
    ap.add_argument("--compile", action="store_true", help="torch.compile stapo's per-chunk functions")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: allow TF32 matmuls for every variant (bf16 inputs are exact in TF32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh workers per variant, interleaved")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch's default)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", type=Path, help="append raw results (one JSON per line)")
    args = ap.parse_args(argv)

    print(f"Machine: {machine_description(args.device)}\n")
    print("Command: `.venv/bin/python " + " ".join([str(HERE.relative_to(ROOT))] + sys.argv[1:]) + "`\n")
    rows = []
    for n in args.n:
        runs: dict[tuple, list[dict]] = {}
        for rnd in range(args.rounds):  # rounds interleave the variants, so load drift hits all alike
            for variant in args.variants:
                for chunk in args.chunk_sizes if variant == "stapo" else [None]:
                    spec = {
                        "variant": variant, "n": n, "hidden": args.hidden, "vocab": args.vocab,
                        "device": args.device, "dtype": args.dtype, "temperature": args.temperature,
                        "chunk_size": chunk or DEFAULT_CHUNK_SIZE, "frozen_head": args.frozen_head,
                        "compile": args.compile and variant == "stapo", "tf32": args.tf32,
                        "threads": args.threads, "repeats": args.repeats, "round": rnd,
                    }
                    r = run_worker(str(HERE), spec, timeout=args.timeout)
                    runs.setdefault((variant, chunk), []).append(r)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                    print(f"  round {rnd} {variant} n={n} chunk={chunk}: "
                          + (r.get("error") or f"{r['median_s']:.3f} s, {fmt_bytes(r['peak_bytes'])}"), flush=True)
        rows += ratio_rows(n, [combine_rounds(rs) for rs in runs.values()])
    print()
    threads = args.threads or "default"
    print(f"H = {args.hidden}, V = {args.vocab}, {args.dtype} on {args.device} ({threads} threads), τ = {args.temperature}, "
          f"{'frozen head' if args.frozen_head else 'hidden and W trainable'}, median of {args.repeats} runs"
          + (f", median over {args.rounds} interleaved rounds" if args.rounds > 1 else "") + "\n")
    print(markdown_table(RATIO_HEADER, rows))
    return 0


if __name__ == "__main__":
    spec = worker_spec(sys.argv)
    if spec is not None:
        sys.path.insert(0, str(ROOT / "src"))
        print(json.dumps(worker(spec)))
    else:
        raise SystemExit(main())
