"""Supervised warm start for the demo: next-token loss on reference solutions only.

Shapes: B = examples in a batch, L = longest prompt+response in the batch.

Each example is the chat-templated prompt (exactly what the RL trainer feeds the
policy, see ``encode_prompt``) followed by the reference solution and EOS. The loss
is the token-mean cross-entropy over response tokens (prompt and padding labels are
-100), so the model learns to answer, not to reproduce questions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from ..data.problem import Problem
from ..data.prompts import encode_prompt as encode

IGNORE = -100  # label value HF's causal-LM loss skips


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-templated user turn, ending in the generation prompt ("Answer: ")."""
    return encode(prompt, tokenizer, template="none", use_chat_template=True)[1]  # the trainer's encoding


def encode_example(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``; the response is the reference solution + EOS."""
    solution = problem.meta.get("solution") if isinstance(problem.meta, dict) else None
    if not solution:
        raise ValueError(f"problem {problem.id!r}: meta['solution'] must hold the reference solution text")
    response = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return encode_prompt(tokenizer, problem.prompt), response


def insert_junk(
    response: list[int], rate: float, vocab: Sequence[int], rng: random.Random
) -> tuple[list[int], list[int]]:
    """``(ids, junk_positions)``: a random ``vocab`` token inserted before each response token w.p. ``rate``.

    The junk never goes before the first token or after EOS. ``collate_sft`` drops the junk
    positions from the loss, so the model learns to continue the solution after an
    off-distribution token (as a pretrained LLM reads past one) without learning to emit it.
    """
    ids, junk = response[:1], []
    for token in response[1:]:
        if rng.random() < rate:
            junk.append(len(ids))
            ids.append(rng.choice(vocab))
        ids.append(token)
    return ids, junk


def collate_sft(examples: Sequence[tuple], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` [B, L]; labels are -100 off the response.

    An example is ``(prompt_ids, response_ids)`` or ``(prompt_ids, response_ids, ignored)``, where
    ``ignored`` lists response positions left out of the loss (``insert_junk``).
    """
    width = max(len(ex[0]) + len(ex[1]) for ex in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, L]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # [B, L]
    for i, (p, r, *ignored) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
        for j in ignored[0] if ignored else ():
            labels[i, len(p) + j] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy of the response tokens (HF shifts labels internally)."""
    # Positions from the mask, as `generate` computes them for left-padded prompts
    # (transformers GenerationMixin._prepare_position_ids_for_generation).
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=pos,
        labels=batch["labels"],
    ).loss


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_ratio * lr`` at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_sft(
    model,
    examples: Sequence[tuple],
    *,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    stop: Callable[[int], bool] | None = None,
    stop_every: int = 100,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on ``examples`` taken in order, ``batch_size`` per step (cycling if too few).

    ``stop(steps_done)`` is called every ``stop_every`` steps; when it returns True the
    pass ends early (the schedule is still the one planned for ``steps``). Returns the
    per-step losses, so ``len(result)`` is the number of steps taken. ``on_step(steps_done, loss)``
    follows every step (progress).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps/batch_size: must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not examples:
        raise ValueError("examples: empty SFT set")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        start = step * batch_size
        chunk = [examples[(start + j) % len(examples)] for j in range(batch_size)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps)
        loss = sft_loss(model, collate_sft(chunk, pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"sft step {step + 1}/{steps}  loss {losses[-1]:.4f}  lr {opt.param_groups[0]['lr']:.2e}")
        if stop is not None and (step + 1) % stop_every == 0 and step + 1 < steps and stop(step + 1):
            break
    model.eval()
    return losses
