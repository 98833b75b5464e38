#!/usr/bin/env bash
# GPU check of stapo.integrations.verl: a few real `python -m verl.trainer.main_ppo` steps with
# loss_mode=stapo (FSDP engine, vLLM rollouts, Ray) on a random-init model with Qwen3-0.6B's
# transformer body (28 layers, hidden 1024, 16 / 8 heads, head_dim 128, MLP 3072). The vocabulary is a
# tokenizer trained here on MATH problems (no hub access), so the model's vocab is that tokenizer's.
#
# Not part of CI (it needs a CUDA GPU). Run it on a GPU machine in an environment with verl's GPU stack
# (e.g. `pip install 'verl[vllm]==0.9.1'`, which brings a CUDA torch and vLLM) and stapo installed:
#     bash scripts/verl_gpu_check.sh            # OUT, DATA, STEPS, GPUS override the defaults
# Passes when the run finishes STEPS training steps and verl's console logger printed the S2T metrics
# (actor/s2t/masked_fraction, actor/s2t/entropy_threshold), i.e. the loss ran with the mask.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stapo-verl-gpu-check}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-3}
GPUS=${GPUS:-1}
PY=${PY:-python}
mkdir -p "$OUT"

"$PY" - "$OUT" "$DATA" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from stapo.models.tiny import train_tokenizer

out, data = Path(sys.argv[1]), Path(sys.argv[2])
problems = json.loads((data / "train" / "math_train.json").read_text())
tok = train_tokenizer([p["problem"] for p in problems] + [p["answer"] for p in problems], vocab_size=4096)
config = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                     tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
torch.manual_seed(0)
model = Qwen3ForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out / "model")
tok.save_pretrained(out / "model")
print(f"random-init Qwen3 body: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, vocab {len(tok)}")
EOF

"$PY" -m stapo data convert "$DATA/train/math_train.json" "$OUT/train.parquet" --template dapo --source math_dapo \
    --limit 256
"$PY" -m stapo data convert math500 "$OUT/val.parquet" --data-dir "$DATA" --template dapo --limit 32

CONFIG_DIR=$("$PY" -c "from stapo.integrations.verl import CONFIG_DIR; print(CONFIG_DIR)")
"$PY" -m verl.trainer.main_ppo --config-path="$CONFIG_DIR" --config-name=stapo_trainer \
    algorithm.adv_estimator=grpo \
    data.train_files="$OUT/train.parquet" data.val_files="$OUT/val.parquet" \
    data.train_batch_size=16 data.max_prompt_length=512 data.max_response_length=256 \
    actor_rollout_ref.model.path="$OUT/model" \
    actor_rollout_ref.model.external_lib=stapo.integrations.verl \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=8 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.clip_ratio_c=10.0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.policy_loss.loss_mode=stapo \
    actor_rollout_ref.actor.policy_loss.tau_p=0.05 \
    actor_rollout_ref.actor.policy_loss.entropy_quantile=0.75 \
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    algorithm.use_kl_in_reward=False \
    trainer.logger='[console]' trainer.project_name=stapo-verl-check trainer.experiment_name=gpu-check \
    trainer.n_gpus_per_node="$GPUS" trainer.nnodes=1 trainer.total_training_steps="$STEPS" \
    trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=-1 \
    trainer.default_local_dir="$OUT/ckpt" 2>&1 | tee "$OUT/log.txt"

grep -q "actor/s2t/masked_fraction" "$OUT/log.txt" && grep -q "actor/s2t/entropy_threshold" "$OUT/log.txt" \
    || { echo "FAIL: no S2T metrics in $OUT/log.txt"; exit 1; }
echo "PASS: $STEPS verl steps with loss_mode=stapo; log in $OUT/log.txt"
