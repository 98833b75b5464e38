"""stapo.ops.model_token_stats on real tiny transformers models (Qwen3, PEFT LoRA, Gemma 2)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stapo.models.tiny import tiny_model_and_tokenizer
from stapo.ops import fast_path_blocker, generation_position_ids, model_token_stats

TEXTS = ["1 + 1 = 2", "what is 12 times 3? it is 36", "the answer is 42", "compute 7 - 5 = 2"] * 5
PROMPTS = ["1 + 1", "what is 12 times 3?", "the"]  # different lengths: real left padding


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model_and_tokenizer(TEXTS)


def generated_batch(model, tok, **gen_kwargs):
    """A left-padded prompt batch, its generation, and the scores generate() saw."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=7, output_scores=True, return_dict_in_generate=True,
                         **gen_kwargs)
    p = enc.input_ids.shape[1]
    # generate attends to every generated position (also after EOS), so the mask there is 1
    mask = torch.cat([enc.attention_mask, torch.ones_like(out.sequences[:, p:])], dim=1)
    return out.sequences, mask, p, torch.stack(out.scores, dim=1)  # [B, L], [B, L], P, [B, T, V]


def assert_grads_close(got, want):
    """Two fp32 computations of the same gradients: elementwise to 1e-4, or 1e-5 of the largest entry."""
    assert got and got.keys() == want.keys()
    for name in got:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def params_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- agreement with generate ------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("sampling", [False, True])
def test_logprobs_equal_generate_scores(model_tok, fast, sampling):
    model, tok = model_tok
    assert (tok(PROMPTS, padding=True, return_tensors="pt").attention_mask == 0).any()  # left padding
    temperature = 0.7 if sampling else 1.0
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0} if sampling else {"do_sample": False}
    seq, mask, p, scores = generated_batch(model, tok, **gen)
    # with no logits processors but the temperature warper, scores = logits / τ
    want = torch.log_softmax(scores.float(), -1).gather(-1, seq[:, p:, None]).squeeze(-1)  # [B, T]
    with torch.no_grad():
        out = model_token_stats(model, seq, mask, p, temperature=temperature, fast=fast, with_collision=True)
    assert out.logprobs.shape == seq[:, p:].shape
    torch.testing.assert_close(out.logprobs, want, rtol=0, atol=1e-4)
    probs = torch.softmax(scores.float(), -1)
    torch.testing.assert_close(out.entropy, -(probs * probs.log()).sum(-1), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.collision, (probs * probs).sum(-1), rtol=0, atol=1e-5)


def test_absolute_positions_model_matches_generate(model_tok):
    # GPT-2 adds absolute position embeddings: numbering from the first pad would change every
    # statistic of a left-padded row, so this checks the explicit generation position ids
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = model_tok
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    assert fast_path_blocker(model) is None
    seq, mask, p, scores = generated_batch(model, tok, do_sample=False)
    want = torch.log_softmax(scores.float(), -1).gather(-1, seq[:, p:, None]).squeeze(-1)
    with torch.no_grad():
        out = model_token_stats(model, seq, mask, p)
        plain = model(seq, attention_mask=mask).logits[:, p - 1 : -1].log_softmax(-1)
    torch.testing.assert_close(out.logprobs, want, rtol=0, atol=1e-4)
    plain_lp = plain.gather(-1, seq[:, p:, None]).squeeze(-1)
    assert (plain_lp - want).abs().max() > 1e-2  # without them the padded rows are off


def test_position_ids_follow_generate():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert generation_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# --- fast path == full-logits path, values and gradients ----------------------------------------


def test_fast_equals_fallback_with_gradients(model_tok):
    model, tok = model_tok
    seq, mask, p, _ = generated_batch(model, tok, do_sample=True, top_k=0, top_p=1.0)
    weights = torch.linspace(-1, 1, seq[:, p:].numel()).view(seq.shape[0], -1)
    fast = model_token_stats(model, seq, mask, p, temperature=0.9, chunk_size=4)
    slow = model_token_stats(model, seq, mask, p, temperature=0.9, fast=False)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.entropy, slow.entropy, rtol=1e-5, atol=1e-5)
    g_fast = params_grad(model, (fast.logprobs * weights).sum())
    g_slow = params_grad(model, (slow.logprobs * weights).sum())
    assert "model.embed_tokens.weight" in g_fast  # the tied head gets its gradient
    assert_grads_close(g_fast, g_slow)


class _VocabRows(TorchDispatchMode):
    """Largest number of rows of any computed op output whose last dim is the vocabulary (views such
    as the head weight's transpose [H, V] allocate nothing and are skipped)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_prompt_positions_never_reach_the_vocabulary(model_tok):
    model, tok = model_tok
    seq, mask, p, _ = generated_batch(model, tok, do_sample=False)
    b, t = seq[:, p:].shape
    vocab = model.config.vocab_size
    assert vocab != model.config.hidden_size  # else the probe could not tell the two apart
    with _VocabRows(vocab) as probe:
        model_token_stats(model, seq, mask, p).logprobs.sum().backward()
    assert 0 < probe.rows <= b * t < b * seq.shape[1]
    with _VocabRows(vocab) as probe:  # the probe sees full logits when they exist
        model(seq, attention_mask=mask).logits.sum()
    assert probe.rows == b * seq.shape[1]


def test_autocast_bf16(model_tok):
    model, tok = model_tok
    seq, mask, p, _ = generated_batch(model, tok, do_sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model_token_stats(model, seq, mask, p)
        slow = model_token_stats(model, seq, mask, p, fast=False)
    assert fast.logprobs.dtype == torch.float32
    # both run the body in bf16; the fast head is fp32, the fallback's bf16: agree to bf16 precision
    torch.testing.assert_close(fast.logprobs, slow.logprobs, rtol=0.05, atol=0.05)
    grads = params_grad(model, fast.logprobs.sum())
    assert all(torch.isfinite(g).all() for g in grads.values()) and len(grads) > 0


# --- PEFT -------------------------------------------------------------------------------------


def _lora(model, target_modules):
    peft = pytest.importorskip("peft")
    import copy

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def test_peft_lora_fast_path(model_tok):
    model, tok = model_tok
    peft_model = _lora(model, ["q_proj", "v_proj"])
    assert fast_path_blocker(peft_model) is None
    seq, mask, p, _ = generated_batch(model, tok, do_sample=False)
    fast = model_token_stats(peft_model, seq, mask, p)
    slow = model_token_stats(peft_model, seq, mask, p, fast=False)
    base = model_token_stats(model, seq, mask, p)
    assert (fast.logprobs - base.logprobs).abs().max() > 1e-3  # the adapter is live (random B)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, rtol=1e-5, atol=1e-5)
    g_fast = params_grad(peft_model, fast.logprobs.sum())
    g_slow = params_grad(peft_model, slow.logprobs.sum())
    assert all("lora_" in n for n in g_fast)
    assert_grads_close(g_fast, g_slow)


def test_peft_adapter_on_the_head_falls_back(model_tok):
    model, tok = model_tok
    peft_model = _lora(model, ["q_proj", "lm_head"])
    assert "not a plain torch.nn.Linear" in fast_path_blocker(peft_model)
    seq, mask, p, _ = generated_batch(model, tok, do_sample=False)
    with torch.no_grad():
        logits = peft_model(input_ids=seq, attention_mask=mask,
                            position_ids=generation_position_ids(mask)).logits[:, p - 1 : -1]
        out = model_token_stats(peft_model, seq, mask, p)
    want = torch.log_softmax(logits, -1).gather(-1, seq[:, p:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, want, rtol=1e-5, atol=1e-5)


# --- models whose logits are not head(body) ------------------------------------------------------


def test_softcapped_model_falls_back():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=90, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, final_logit_softcapping=2.0,
                       pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of a few units, where the cap at 2 bites
    assert "final_logit_softcapping" in fast_path_blocker(model)
    ids = torch.randint(1, 90, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, 3:-1]  # [2, 5, 90], soft-capped
        head_of_body = model.lm_head(model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
        out = model_token_stats(model, ids, mask, 4)
    assert (head_of_body[:, 3:-1] - logits).abs().max() > 0.1  # the naive split would be wrong here
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments(model_tok):
    model, _ = model_tok
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="response_start"):
        model_token_stats(model, ids, torch.ones_like(ids), 5)
    with pytest.raises(ValueError, match="response_start"):
        model_token_stats(model, ids, torch.ones_like(ids), 0)
    with pytest.raises(ValueError, match="attention_mask"):
        model_token_stats(model, ids, torch.ones(2, 4, dtype=torch.long), 2)
