"""GPU check of the eval harness; run through benchmarks/gpu_check_eval.sh (see there).

    python benchmarks/gpu_check_eval.py WORK_DIR MAX_NEW_TOKENS [--cpu-smoke]

``--cpu-smoke`` swaps in a 2-layer, hidden-64 model on the CPU, to check this script's code path
on a machine without a GPU; its numbers mean nothing.
"""

import json
import sys
import time
from pathlib import Path

# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B): 28 layers, hidden 1024, 16 query / 8 kv heads
# of 128, MLP 3072, vocab 151936, tied embeddings. Random weights: only the shapes matter here.
QWEN3_0_6B = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "rope_theta": 1e6,
}
SMOKE = dict(
    QWEN3_0_6B,
    vocab_size=4000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=128,
)


def main(work: Path, max_new: int, smoke: bool) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from stapo.data import load_benchmark
    from stapo.eval import EvalSettings, evaluate
    from stapo.models.tiny import train_tokenizer

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    if not smoke:
        assert torch.cuda.is_available(), "this check needs a CUDA device (or --cpu-smoke)"
    problems = load_benchmark("math500")[:8]
    # no hub: a BPE trained on MATH500's own questions stands in for Qwen's tokenizer (prompts of a
    # similar length); the random model samples ids beyond it, which decode to nothing
    tok = train_tokenizer([p.prompt for p in load_benchmark("math500")], vocab_size=2000)
    cfg = Qwen3Config(
        **(SMOKE if smoke else QWEN3_0_6B),
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}, {name}")
    settings = EvalSettings(benchmarks=("math500",), max_new_tokens=max_new, batch_size=64)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    results = evaluate(
        model, tok, {"math500": problems}, settings, work / "eval", model_name="random-qwen3-0.6b"
    )
    wall = time.perf_counter() - t0
    timing = json.loads((work / "eval" / "timing.json").read_text())
    print(
        f"samples {timing['samples']}  tokens {timing['tokens']}  generate+verify {timing['seconds']:.1f} s"
        f"  -> {timing['tokens_per_s']:.0f} tokens/s  (evaluate() wall {wall:.1f} s)"
    )
    if device == "cuda":
        print(f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"avg@4 {results['benchmarks']['math500']['avg']:.3f} (random model: expect 0)")


if __name__ == "__main__":  # the reward pool spawns workers that re-import this file
    main(Path(sys.argv[1]), int(sys.argv[2]), "--cpu-smoke" in sys.argv[3:])
