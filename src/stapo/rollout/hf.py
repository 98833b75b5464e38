"""Hugging Face ``generate`` backend (the default): runs anywhere transformers runs."""

from __future__ import annotations

import torch

from ..batch import left_pad
from .base import Generation, Generator, SamplingConfig


class HFGenerator(Generator):
    """Samples with ``model.generate`` in row batches of ``batch_size`` (prompt × sample) sequences.

    Uses the model object itself, so ``update_weights`` has nothing to copy. Sampled
    log-probs are not returned (``logprobs=None``): the trainer recomputes them with
    its own forward pass, which is the quantity the loss needs anyway.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, synced_gpus: bool = False):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad_token_id; set tokenizer.pad_token before generating")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced_gpus = synced_gpus  # FSDP: keep decoding until every rank is done (matched collectives)

    def update_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        rows = [p for p in prompts for _ in range(sampling.n)]  # responses of one prompt contiguous
        out: list[Generation] = []
        with torch.random.fork_rng(devices=[], enabled=sampling.seed is not None):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.batch_size):
                out.extend(self._generate_rows(rows[start : start + self.batch_size], sampling))
        return [out[i : i + sampling.n] for i in range(0, len(out), sampling.n)]

    def _generate_rows(self, rows: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        ids, mask = left_pad(rows, tok.pad_token_id)  # generation continues from the last column
        width = ids.shape[1]
        greedy = sampling.temperature <= 0
        was_training = model.training
        model.eval()
        try:
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.long().to(device),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else sampling.top_k,  # explicit: transformers 5 may default top-k on
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                synced_gpus=self.synced_gpus,
            )
        finally:
            model.train(was_training)
        gens = []
        for row in seqs[:, width:].tolist():
            gens.append(_cut_at_eos(row, tok.eos_token_id, tok))
        return gens


def _cut_at_eos(row: list[int], eos_id: int, tokenizer) -> Generation:
    """Everything up to and including the first EOS; what follows is HF's padding."""
    if eos_id in row:
        row = row[: row.index(eos_id) + 1]
        reason = "stop"
    else:
        reason = "length"
    return Generation(row, None, reason, tokenizer.decode(row, skip_special_tokens=True))
