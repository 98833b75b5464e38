"""Checks of the token-level theory on a real model's own samples (issue: "checks of the theory on real data").

For a random sample of response tokens of real rollouts (positions k, logits z ∈ R^V, A = +1):

1. gradient norm: the closed form w²(1 − 2p + Σπ²) against autograd of J = A·log softmax(z)_k;
2. bounds: w²(1 − 2p + e^{−H}) ≤ ‖∇_z J‖² ≤ w²(2 − 2p − C_V H²) for every token;
3. logit level: the measured ΔH after a tiny gradient step z + ηA(e_k − π), against the sign of the
   exact first-order form and of the paper's criterion p < e^{−H}; and after a tiny step along the
   natural-gradient direction A e_k / p, against the paper's criterion (exact to first order there);
4. whole model: a tiny gradient-ascent step on all parameters for J = A·log π_k at one position,
   then the measured entropy change at that position, against both predictions.

Everything runs on a float64 copy of the model, so the measured changes are far above rounding; the
copy and the per-token parameter steps make it a check for small models (the tiny Qwen3, a 0.5B model on a GPU).
"""

from __future__ import annotations

import copy
import math

import torch

from ..objectives.masks import TAU_P
from . import theory

__all__ = ["theory_check", "theory_markdown"]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _agree(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    return float((torch.sign(measured) == torch.sign(predicted)).double().mean()) if measured.numel() else math.nan


def _sample_rollouts(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature, seed):
    from ..rollout import HFGenerator, SamplingConfig

    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
                  for p in prompts]
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("theory_check needs at least one non-empty prompt")
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, n=samples_per_prompt,
                              seed=seed)
    generations = HFGenerator(model, tokenizer).generate(prompt_ids, sampling)
    return [(p, g.response_ids) for p, gens in zip(prompt_ids, generations) for g in gens if g.response_ids]


def theory_check(
    model,
    tokenizer,
    prompts: list,
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    n_tokens: int = 512,
    n_model_tokens: int = 64,
    eta: float = 1e-5,
    model_step: float = 1e-5,
    seed: int = 0,
    progress=None,
) -> dict:
    """Run checks 1–4 above; returns the measured numbers and a Markdown summary under ``"markdown"``.

    ``prompts``: strings (encoded without special tokens) or token-id lists. ``n_tokens`` logit-level
    tokens are drawn at random from the samples, the first ``n_model_tokens`` of them also get the
    whole-model step. ``eta`` is the logit step η; ``model_step`` the parameter-space length of the
    model step (η = model_step / ‖∇_θ J‖; the sign of a first-order change ignores the positive scale).
    Keys: ``n_sequences``, ``n_tokens``, ``grad_norm_max_rel_err``, ``lower_bound_violations``,
    ``upper_bound_violations``, ``logit_exact_agreement``, ``logit_paper_agreement``,
    ``natural_paper_agreement``, ``paper_exact_agreement``, ``n_model_tokens``,
    ``model_exact_agreement``, ``model_paper_agreement``, ``entropy_up_measured_fraction``, ``markdown``.
    ``progress``: a ``stapo.progress.Reporter`` told each phase (None: silent).
    """
    say = progress.phase if progress is not None else (lambda _text: None)
    say(f"theory check: sampling {samples_per_prompt} responses to each of {len(prompts)} prompts")
    rollouts = _sample_rollouts(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature, seed)
    if not rollouts:
        raise ValueError("the model produced no response tokens for the theory check")
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    # every response position: (sequence, index into the full sequence of the logits row, token id)
    positions = [(s, len(p) - 1 + t, tok) for s, (p, r) in enumerate(rollouts) for t, tok in enumerate(r)]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(positions), generator=gen)[:n_tokens].tolist()
    chosen = [positions[i] for i in order]

    device = next(m64.parameters()).device
    say(f"theory check: float64 logits of {len(rollouts)} sequences, logit-level checks on {len(chosen)} tokens")
    with torch.no_grad():
        seq_logits = [m64(input_ids=torch.tensor([p + r], device=device)).logits[0].cpu()  # [L, V] each
                      for p, r in rollouts]
    z = torch.stack([seq_logits[s][row] for s, row, _ in chosen])  # [N, V] float64, on CPU
    k = torch.tensor([tok for _, _, tok in chosen])  # [N]
    n, vocab = z.shape
    adv = torch.ones(n, dtype=torch.float64)  # A = +1: the positive-advantage tokens of the taxonomy

    # 1. closed form vs autograd
    zg = z.clone().requires_grad_(True)
    j = (adv * torch.log_softmax(zg, -1).gather(-1, k[:, None]).squeeze(-1)).sum()
    (grad,) = torch.autograd.grad(j, zg)
    autograd_sq = (grad * grad).sum(-1)  # [N]
    st = theory.logit_stats(z, k, dtype=torch.float64)
    prob = st.logprobs.exp()
    closed_sq = theory.logit_grad_norm_sq(adv, prob, st.collision)
    rel_err = ((closed_sq - autograd_sq).abs() / autograd_sq.clamp(min=1e-300)).max()

    # 2. bounds (float64 statistics: only rounding may touch the tight end)
    lower, upper = theory.grad_norm_sq_bounds(adv, prob, st.entropy, vocab)
    tol = 1e-12
    lower_viol = int((closed_sq < lower - tol).sum())
    upper_viol = int((closed_sq > upper + tol).sum())

    # 3. logit-level steps
    pi = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(k, vocab).to(torch.float64)
    h0 = _entropy(z)
    dh_plain = _entropy(z + eta * adv[:, None] * (onehot - pi)) - h0
    # natural-gradient direction A e_k / p, rescaled by p > 0 so rare tokens still get a tiny step
    dh_nat = _entropy(z + eta * adv[:, None] * onehot) - h0
    pred_exact = theory.entropy_change_exact(st.logprobs, st.entropy, st.collision, st.p2logp, adv)
    pred_paper = theory.entropy_change_natural(st.logprobs, st.entropy, adv)

    # 4. whole model: one tiny gradient-ascent step per token, entropy re-measured at its position
    m_count = min(n_model_tokens, n)
    task = progress.task("theory check: whole-model steps", m_count, unit="tokens") if progress else None
    dh_model = _model_steps(m64, rollouts, chosen[:m_count], adv[:m_count], model_step, task)

    out = {
        "n_sequences": len(rollouts),
        "n_tokens": n,
        "vocab_size": vocab,
        "grad_norm_max_rel_err": float(rel_err),
        "lower_bound_violations": lower_viol,
        "upper_bound_violations": upper_viol,
        "logit_exact_agreement": _agree(dh_plain, pred_exact),
        "logit_paper_agreement": _agree(dh_plain, pred_paper),
        "natural_paper_agreement": _agree(dh_nat, pred_paper),
        "paper_exact_agreement": _agree(pred_exact, pred_paper),
        "entropy_up_measured_fraction": float((dh_plain > 0).double().mean()),
        "low_p_fraction": float((prob < TAU_P).double().mean()),  # S2T's τ_p
        "n_model_tokens": m_count,
        "model_exact_agreement": _agree(dh_model, pred_exact[:m_count]),
        "model_paper_agreement": _agree(dh_model, pred_paper[:m_count]),
        "eta": eta,
        "model_step": model_step,
    }
    out["markdown"] = theory_markdown(out)
    return out


def _model_steps(m64, rollouts, chosen, adv, model_step: float, task=None) -> torch.Tensor:
    """Measured ΔH at each chosen position after θ ← θ + η ∇_θ J, J = A·log π_k there.

    The stepped model is evaluated with ``torch.func.functional_call`` (tied weights stay tied),
    so the parameters are never modified in place and one forward graph serves a whole sequence.
    """
    from torch.func import functional_call

    named = {n: p for n, p in m64.named_parameters() if p.requires_grad}
    out = torch.zeros(len(chosen), dtype=torch.float64)
    by_seq: dict[int, list[int]] = {}
    for i, (s, _, _) in enumerate(chosen):
        by_seq.setdefault(s, []).append(i)
    for s, idx in by_seq.items():
        ids = torch.tensor([rollouts[s][0] + rollouts[s][1]], device=next(m64.parameters()).device)
        logits = m64(input_ids=ids).logits[0]  # [L, V]
        for i in idx:
            _, row, tok = chosen[i]
            j = adv[i] * torch.log_softmax(logits[row], -1)[tok]
            grads = torch.autograd.grad(j, list(named.values()), retain_graph=True)
            norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
            with torch.no_grad():
                stepped = {n: p + (model_step / norm) * g for (n, p), g in zip(named.items(), grads)}
                h1 = _entropy(functional_call(m64, stepped, (), {"input_ids": ids}).logits[0, row])
                out[i] = float(h1 - _entropy(logits[row]))
            if task is not None:
                task.advance()
    return out


def theory_markdown(r: dict) -> str:
    """A short Markdown section from ``theory_check``'s numbers."""
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    return "\n".join([
        (f"Sampled {r['n_tokens']} response tokens from {r['n_sequences']} of the model's own rollouts "
         f"(|V| = {r['vocab_size']}, A = +1; {pct(r['low_p_fraction'])} have p < {TAU_P:g}); float64."),
        "",
        "| check | result |",
        "|---|---|",
        f"| closed-form ‖∇_z J‖² vs autograd, max relative error | {r['grad_norm_max_rel_err']:.2e} |",
        f"| lower bound w²(1−2p+e^(−H)) violated | {r['lower_bound_violations']} / {r['n_tokens']} |",
        f"| upper bound w²(2−2p−C_V H²) violated | {r['upper_bound_violations']} / {r['n_tokens']} |",
        (f"| logit step (η = {r['eta']:g}): exact first-order ΔH agrees in sign | "
         f"{pct(r['logit_exact_agreement'])} |"),
        f"| logit step: paper criterion p < e^(−H) agrees in sign | {pct(r['logit_paper_agreement'])} |",
        f"| natural-gradient logit step: paper criterion agrees in sign | {pct(r['natural_paper_agreement'])} |",
        (f"| whole-model step ({r['n_model_tokens']} tokens, ‖Δθ‖ = {r['model_step']:g}): exact form agrees | "
         f"{pct(r['model_exact_agreement'])} |"),
        f"| whole-model step: paper criterion agrees | {pct(r['model_paper_agreement'])} |",
        f"| the two predictions agree with each other | {pct(r['paper_exact_agreement'])} |",
        "",
        f"Measured: {pct(r['entropy_up_measured_fraction'])} of the plain logit steps raised the entropy.",
    ])
