"""The teacher pass: the current policy scores the student's sampled tokens in the privileged context.

Shapes: B rows (P prompts × G samples), Lp the student's prompt length, Lt the teacher's (both
left-padded), T response tokens (right-padded).

    teacher input  = [teacher prompt (Lt) | the student's response tokens (T)]      [B, Lt + T]
    teacher_logprobs[b, t] = log π_θ(y_bt | x_b, hint_b, y_b,<t) at the rollout T    [B, T]

The responses are the student's own tokens, unchanged, so position t of ``teacher_logprobs`` is the
same token as position t of ``old_logprobs``; the response mask and the attention over the response
come from the student's batch. No extra model: the teacher is the policy at the weights that sampled
the step (self-distillation), run under ``torch.no_grad`` at the rollout temperature, like
``old_logprobs``, so δ = teacher − old compares two contexts of one distribution family.
"""

from __future__ import annotations

import dataclasses

import torch

from ..batch import RolloutBatch, left_pad
from ..data.prompts import chat_mode, tokenize_prompt
from .context import teacher_prompt


def teacher_prompt_ids(problems: list, tokenizer, *, template: str = "boxed", hint_template: str = "reference",
                       answer_template: str = "The final answer is {answer}.",
                       use_chat_template: bool | str = "auto") -> list[list[int]]:
    """Token ids of each problem's teacher prompt (rendered once per distinct problem: G rows share one)."""
    cache: dict[tuple, list[int]] = {}
    out = []
    for p in problems:
        key = (p.source, p.id, p.prompt)
        if key not in cache:
            text = teacher_prompt(p, tokenizer, template=template, hint_template=hint_template,
                                  answer_template=answer_template, use_chat_template=use_chat_template)
            cache[key] = tokenize_prompt(tokenizer, text)
        out.append(cache[key])
    return out


def teacher_batch(batch: RolloutBatch, prompt_ids: list[list[int]], pad_token_id: int) -> RolloutBatch:
    """``batch`` with its prompts replaced by ``prompt_ids`` (left-padded to Lt); responses untouched."""
    if len(prompt_ids) != len(batch):
        raise ValueError(f"prompt_ids: {len(prompt_ids)} teacher prompts for a batch of {len(batch)} rows")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: a teacher prompt tokenized to no tokens")
    ids, mask = left_pad(prompt_ids, pad_token_id)  # [B, Lt]
    return dataclasses.replace(batch, prompt_ids=ids.to(batch.prompt_ids.device),
                               prompt_mask=mask.to(batch.prompt_mask.device))


def _context_options(cfg) -> dict:
    chat = chat_mode(cfg.data.use_chat_template)
    return {"template": cfg.data.template, "hint_template": cfg.distill.hint_template,
            "answer_template": cfg.distill.answer_template, "use_chat_template": chat}


@torch.no_grad()
def compute_teacher_logprobs(model, batch: RolloutBatch, tokenizer, cfg, device) -> torch.Tensor:
    """The teacher's log-probs of the responses, [B, T] (fp32, CPU, no grad): the privileged-context
    pass. The caller attaches them (``dataclasses.replace(batch, teacher_logprobs=...)``).

    ``cfg``: the ``TrainConfig`` (``data.template``, ``data.use_chat_template``, ``distill.*``,
    ``rollout.temperature``, ``optim.micro_batch_size``). ``batch.problems`` supplies the hints.
    """
    from ..ops import model_token_stats

    if len(batch.problems) != len(batch):
        raise ValueError(f"batch.problems: the teacher needs one problem record per row, got "
                         f"{len(batch.problems)} for {len(batch)} rows")
    ids = teacher_prompt_ids(batch.problems, tokenizer, **_context_options(cfg))
    teacher = teacher_batch(batch, ids, tokenizer.pad_token_id)
    parts = []
    for micro in teacher.split(cfg.optim.micro_batch_size):
        micro = micro.to(device)
        out = model_token_stats(model, micro.input_ids, micro.attention_mask, micro.prompt_ids.shape[1],
                                temperature=cfg.rollout.temperature, with_entropy=False)
        parts.append(out.logprobs.float().cpu())  # [b, T]
    return torch.cat(parts)
