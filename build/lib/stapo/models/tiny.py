"""Tiny models and tokenizers built locally, for tests and the demo (no hub downloads).

The tokenizer is a byte-level-free BPE trained with `tokenizers` on the caller's
texts, with every digit split into its own token (so arithmetic is learnable) and
the special tokens <pad>, <bos>, <eos>. The model is a real Qwen3 architecture
from `transformers` with random weights; head_dim defaults to 32, the smallest
size vLLM's CPU kernels support.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# Plain prompt/response layout; the chat template renders it for `apply_chat_template` users.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 96, chat_template: bool = True):
    """A ``PreTrainedTokenizerFast`` trained on ``texts``: BPE, digits split, whitespace-aware."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFKC()
    # Metaspace keeps spaces in the tokens so decode(encode(x)) == x
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace(prepend_scheme="never")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen3(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    seed: int = 0,
):
    """A randomly initialised ``Qwen3ForCausalLM`` (fp32, eval mode, ~0.5M params at the defaults)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def tiny_model_and_tokenizer(texts: Iterable[str], vocab_size: int = 96, seed: int = 0, **model_kwargs):
    """Train a tokenizer on ``texts`` and build a matching tiny Qwen3."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_qwen3(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        **model_kwargs,
    )
    return model, tokenizer
