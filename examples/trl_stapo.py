"""STAPO inside TRL: GRPOTrainer + the S2T mask, on a verl-schema parquet, scored by stapo's `math` reward.

    pip install 'stapo[trl]'
    python examples/trl_stapo.py --model Qwen/Qwen2.5-Math-1.5B --data dapo-math-17k.parquet --output-dir runs/trl-stapo

The parquet uses verl's schema (DAPO-Math-17k's, or what ``stapo data convert IN OUT.parquet`` writes): ``prompt`` is a list of
chat messages, ``reward_model.ground_truth`` the gold answer. TRL passes every dataset column to the
reward function, so ``reward_model`` reaches ``MathReward`` below. Everything else (generation,
advantages, the loss, logging, checkpoints) is TRL's; STAPOTrainer only adds the S2T mask and logs
``s2t/masked_fraction``, ``s2t/candidates`` and ``s2t/entropy_threshold`` (docs/trl.md).

Scaling out is TRL's own machinery; the script is the same, only the launcher changes.

    # 8 GPUs, DeepSpeed ZeRO-3 (the config ships with TRL: trl/accelerate_configs/zero3.yaml).
    # One optimizer step = 8 GPUs x 4 completions x 4 accumulation micro-batches = 128 completions,
    # i.e. 16 prompts x 8 samples; the S2T threshold is taken over all 128 (docs/trl.md, "scope").
    accelerate launch --config_file "$(python -c 'import trl, os; print(os.path.dirname(trl.__file__))')/accelerate_configs/zero3.yaml" \
        --num_processes 8 examples/trl_stapo.py \
        --model Qwen/Qwen3-8B-Base --data dapo-math-17k.parquet --output-dir runs/trl-stapo-zero3 \
        --per-device-batch 4 --grad-accum 4 --num-generations 8 --max-completion-length 8192

    # vLLM server mode: generation on GPU 0 (TRL's vLLM server), training on GPUs 1-7 with ZeRO-3.
    CUDA_VISIBLE_DEVICES=0 trl vllm-serve --model Qwen/Qwen3-8B-Base
    CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 accelerate launch --config_file .../accelerate_configs/zero3.yaml \
        --num_processes 7 examples/trl_stapo.py \
        --model Qwen/Qwen3-8B-Base --data dapo-math-17k.parquet --output-dir runs/trl-stapo-vllm \
        --use-vllm server --vllm-server-host 127.0.0.1

    # vLLM colocate mode (vLLM shares each training GPU): add `--use-vllm colocate`.
"""

from __future__ import annotations

import argparse
import sys


class MathReward:
    """A TRL reward function scored by stapo's ``RewardPool("math")`` (math-verify, hard per-item timeout).

    TRL calls it with the completions and every dataset column; ``reward_model`` is verl's
    ``{"style", "ground_truth"}`` column. Completions are chat messages (conversational data) or text.
    """

    __name__ = "math"  # TRL names the reward metrics after it: rewards/math/mean

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, completions, reward_model, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.pool.score_batch(texts, [row["ground_truth"] for row in reward_model])


def load_verl_dataset(path: str):
    """A verl-schema parquet as a TRL dataset (``prompt`` = chat messages), with a clear error on a wrong file."""
    from datasets import load_dataset

    dataset = load_dataset("parquet", data_files=path, split="train")
    missing = {"prompt", "reward_model"} - set(dataset.column_names)
    if missing:
        raise SystemExit(f"{path}: not verl's schema, missing column(s) {sorted(missing)} "
                         f"(has {dataset.column_names})")
    return dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model path or hub id")
    p.add_argument("--data", required=True, help="verl-schema .parquet")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--per-device-batch", type=int, default=8, help="completions per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--num-generations", type=int, default=8, help="samples per prompt (the GRPO group)")
    p.add_argument("--max-completion-length", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--s2t-prob-threshold", type=float, default=0.002, help="τ_p")
    p.add_argument("--s2t-entropy-quantile", type=float, default=0.75, help="q")
    p.add_argument("--no-s2t", action="store_true", help="train the same objective without S2T (the ablation)")
    p.add_argument("--use-vllm", choices=["none", "server", "colocate"], default="none")
    p.add_argument("--vllm-server-host", default="0.0.0.0")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reward-workers", type=int, default=4, help="math-verify processes per training process")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from stapo.integrations.trl import STAPOConfig, STAPOTrainer
    from stapo.rewards import RewardPool

    config = STAPOConfig(
        output_dir=args.output_dir,
        # S2T (the paper's τ_p = 0.002, q = 0.75); STAPOConfig's other defaults are the paper's
        # clip-higher 0.2 / 0.28, dual clip 10 (`delta`) and token-mean `loss_type="dapo"`
        s2t_enabled=not args.no_s2t,
        s2t_prob_threshold=args.s2t_prob_threshold,
        s2t_entropy_quantile=args.s2t_entropy_quantile,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        use_vllm=args.use_vllm != "none",
        vllm_mode=args.use_vllm if args.use_vllm != "none" else "colocate",
        vllm_server_host=args.vllm_server_host,
        bf16=args.precision == "bf16",
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.cpu,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no" if args.cpu else "steps",
        report_to=[],
    )
    dataset = load_verl_dataset(args.data)
    with RewardPool("math", num_workers=args.reward_workers, timeout=5.0) as pool:
        trainer = STAPOTrainer(model=args.model, reward_funcs=MathReward(pool), args=config, train_dataset=dataset)
        trainer.train()
    trainer.save_model(args.output_dir)
    return trainer.state.log_history


if __name__ == "__main__":
    main(sys.argv[1:])
