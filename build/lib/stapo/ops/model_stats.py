"""Token statistics of a Hugging Face causal LM's response tokens, without full logits.

Shapes: B sequences, L = prompt + response length, P = response_start (prompts are
left-padded to P tokens), T = L − P response tokens, H hidden size, V vocabulary.

    input_ids, attention_mask   [B, L]
    hidden = body(input_ids)    [B, L, H] -> sliced to positions P−1 … L−2: [B, T, H]
    targets = input_ids[:, P:]  [B, T]
    outputs                     [B, T]

Fast path: run the model's body (``get_decoder()``), slice the final hidden states to
the positions that predict response tokens, then ``token_stats`` with the output
embedding's weight (and bias). Prompt positions never touch the vocabulary. Fallback
(``fast=False`` or a model the split would get wrong, see ``fast_path_blocker``):
``model(...).logits`` then ``stats_from_logits``.

Positions: ``generate`` numbers a left-padded row from its first real token,
position_ids = cumsum(attention_mask) − 1 with pads at 0 (transformers
``GenerationMixin._prepare_position_ids_for_generation``), while a plain forward without
position_ids numbers from the first pad (Qwen3Model uses arange). With RoPE the shift
cancels in q·k up to rounding, but absolute position embeddings would change, so we pass
the generation numbering explicitly. Response positions must have attention_mask 1 up to
the last token that matters (``generate`` attends to every generated position).
"""

from __future__ import annotations

import inspect

import torch

from .chunked_stats import DEFAULT_CHUNK_SIZE, TokenStatsOut, stats_from_logits, token_stats

# Config fields of transformers models whose ForCausalLM forward changes the logits after
# the head (Gemma 2/3 soft-capping, Cohere logit_scale, Granite logits_scaling, ...): the
# body + linear-head split would silently drop that step.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # None = off; any value = on
    "output_logit_soft_cap": None,
    "logits_soft_cap": None,
    "logit_scale": 1.0,  # the neutral value
    "logits_scaling": 1.0,
    "logits_mup_width_multiplier": 1.0,
}


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask -> [B, L] position ids as ``generate`` assigns them (left padding aware)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def _unwrap_peft(model):
    """(inner causal LM, reason or None). LoRA-style adapters live inside the inner model's
    modules, so its body computes the adapted hidden states; prompt learning adds virtual
    tokens in ``PeftModel.forward`` and must go through it."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is None:
        return model, None
    if getattr(peft_config, "is_prompt_learning", False):
        return model, f"PEFT {peft_config.peft_type} adds virtual tokens in PeftModel.forward"
    return model.get_base_model(), None


def _split(model):
    """(body, head, None) for a model the fast path handles, else (None, None, reason)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None, None, "DistributedDataParallel: the gradient all-reduce hooks run only in its forward"
    inner, reason = _unwrap_peft(model)
    if reason:
        return None, None, reason
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_output_embeddings") or not hasattr(inner, "get_decoder"):
        return None, None, f"{type(inner).__name__} is not a transformers PreTrainedModel"
    if getattr(config, "is_encoder_decoder", False):
        return None, None, "encoder-decoder model"
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return None, None, f"config.{name} = {value} changes the logits after the head"
    head = inner.get_output_embeddings()
    # exactly nn.Linear: PEFT's lora.Linear (adapter on the head) and quantised subclasses
    # compute something other than F.linear(hidden, head.weight, head.bias)
    if type(head) is not torch.nn.Linear:
        return None, None, f"output embeddings are {type(head).__name__}, not a plain torch.nn.Linear"
    if head._forward_hooks or head._forward_pre_hooks:
        return None, None, "the output embeddings carry forward hooks (e.g. accelerate offloading)"
    if head.weight.device.type == "meta" or type(head.weight).__name__ == "DTensor":
        return None, None, "the head weight is offloaded or sharded (meta / DTensor)"
    body = inner.get_decoder()
    if body is inner or body is None:
        return None, None, f"{type(inner).__name__}.get_decoder() does not return a separate body"
    return body, head, None


def fast_path_blocker(model) -> str | None:
    """Why ``model_token_stats`` would use full logits for ``model``; None when the fast path applies."""
    return _split(model)[2]


def _accepts(module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params


def model_token_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    with_collision: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fast: bool = True,
) -> TokenStatsOut:
    """Stats of the response tokens ``input_ids[:, response_start:]`` under ``model``.

    Shapes: input_ids, attention_mask [B, L] (prompt left-padded, response right-padded);
    outputs [B, T] with T = L − response_start, fp32. Position t is log π(input_ids[b, P+t] |
    input_ids[b, :P+t]) at ``temperature`` (the same logits ``generate`` scores, given the same
    attention mask). ``logprobs`` carries gradients into the model; entropy and collision are
    detached. Works for PEFT-wrapped models and under ``torch.autocast``.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    length = input_ids.shape[1]
    if not 1 <= int(response_start) < length:
        raise ValueError(f"response_start must be in [1, L) = [1, {length}), got {response_start}")
    p = int(response_start)
    targets = input_ids[:, p:]  # [B, T]
    position_ids = generation_position_ids(attention_mask)  # [B, L]
    body, head, _ = _split(model) if fast else (None, None, "fast=False")
    kw = {"temperature": temperature, "with_entropy": with_entropy, "with_collision": with_collision}

    if body is None:
        inner, _ = _unwrap_peft(model)
        call = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        fwd = getattr(inner, "module", inner)  # DDP wraps the model in .module
        if _accepts(fwd, "position_ids"):
            call["position_ids"] = position_ids
        if _accepts(fwd, "logits_to_keep"):
            call["logits_to_keep"] = length - p + 1  # the head only sees positions P−1 … L−1
        logits = model(**call).logits[:, p - 1 - length : -1]  # [B, T, V]
        with torch.autocast(input_ids.device.type, enabled=False):
            return stats_from_logits(logits, targets, **kw)

    call = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if _accepts(body, "position_ids"):
        call["position_ids"] = position_ids
    out = body(**call)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, L, H]
    hidden = hidden[:, p - 1 : -1]  # [B, T, H]: the positions that predict response tokens
    return token_stats(hidden, head.weight, targets, bias=head.bias, chunk_size=chunk_size, **kw)
