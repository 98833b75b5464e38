"""Shared set-up of the TRL tests and of the 2-process script: a tiny Qwen3, a real TRL reward
function, and a STAPOTrainer that keeps what it computed so the tests can check it by hand."""

from __future__ import annotations

import copy
import functools

import torch
from datasets import Dataset

from stapo.integrations.trl import STAPOTrainer
from stapo.models.tiny import tiny_model_and_tokenizer

TEXTS = [f"Question: {a}+{b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
NUM_GENERATIONS = 4
# A near-uniform tiny model gives p ≈ 1/96 per token; τ_p = 0.02 makes most positive-advantage
# tokens candidates, so S2T silences a good share of them.
HIGH_PROB_THRESHOLD = 0.02

# Options every test run shares: CPU, fp32, tiny generations, a log entry per step.
BASE = {
    "per_device_train_batch_size": 4,
    "num_generations": NUM_GENERATIONS,
    "max_completion_length": 8,
    "logging_steps": 1,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": [],
    "seed": 0,
    "learning_rate": 1e-3,
    "loss_type": "dapo",
    "epsilon_high": 0.28,
    "delta": 10.0,
    "disable_dropout": True,
    "save_strategy": "no",
    "use_cpu": True,
}


@functools.lru_cache(maxsize=1)
def _pristine():
    return tiny_model_and_tokenizer(TEXTS)


def tiny_model_and_tok():
    """A fresh copy of the same tiny Qwen3 (TRL patches the model it trains) and its tokenizer."""
    model, tok = _pristine()
    return copy.deepcopy(model), tok


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i % 10}+{i // 10}"}] for i in range(n)]})


def digit_fraction(completions, **kwargs) -> list[float]:
    """A real TRL reward function: the share of digits in each completion (varies within a group)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


class RecordingTrainer(STAPOTrainer):
    """A STAPOTrainer that keeps its S2T plans, the per-token stats behind them, and the loss calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plans = []  # (step, S2TPlan, [TokenStats] of its micro-batches)
        self.loss_calls = []  # (step, loss, inputs, logprobs, entropy) of each grad-enabled loss
        self._stats = []

    def _s2t_token_stats(self, inputs):
        stats = super()._s2t_token_stats(inputs)
        self._stats.append(stats)
        return stats

    def _s2t_plan(self, batches, **kwargs):
        self._stats = []
        plan = super()._s2t_plan(batches, **kwargs)
        self.plans.append((self._step, plan, self._stats))
        return plan

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropy, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad:  # the loss pass: keep d loss / d logp
            logps.retain_grad()
            if entropy is not None and entropy.requires_grad:
                entropy.retain_grad()
            self._last_forward = (logps, entropy)
        return logps, entropy, aux

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if loss.requires_grad:
            self.loss_calls.append((self._step, loss.detach(), inputs, *self._last_forward))
        return loss
