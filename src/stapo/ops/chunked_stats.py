"""Per-token log-prob, entropy and collision probability without holding [N, V] logits.

Notation (shapes):
    N rows (tokens; leading dims of ``hidden`` are flattened), H hidden size,
    V vocabulary, C = chunk_size rows per chunk, τ = temperature.

    hidden  [N, H] (any float dtype)    weight [V, H]    bias [V] | None    targets [N] long
    z       = (hidden @ weight.T + bias) / τ           [C, V] per chunk, never [N, V]
    lse     = logsumexp_v z                             [N]   (saved for backward)
    logprob = z[target] − lse                           [N]
    entropy = −Σ_v p_v log p_v = lse − Σ_v p_v z_v      [N]
    collision = Σ_v p_v²                                [N]   (always detached)

Backward (per chunk, logits recomputed from the saved lse; g = upstream grads):
    ∂logprob/∂z = onehot(target) − p
    ∂entropy/∂z = −p ⊙ (log p + H)       (from H = lse − Σ_v p_v z_v)
    g_raw = [g_lp·onehot − p ⊙ (g_lp + g_H·(log p + H))] / τ        [C, V]
    g_hidden = g_raw @ W;   g_W += g_raw.T @ hidden;   g_bias += Σ_rows g_raw
Without an entropy gradient the row scaling g_lp/τ is applied on the [C, H] side instead
(g_hidden = (g_lp/τ) ⊙ (W[t] − P @ W)), so the [C, V] buffer only sees one exp.

Frozen head (only ``hidden`` needs a gradient: LoRA, or a frozen lm_head): row i's
gradient is its upstream scalar times a vector fixed at forward time,
    ∂logprob_i/∂h_i = (W[t_i] − p_i @ W) / τ,   ∂H_i/∂h_i = −((p_i ⊙ log p_i) @ W + H_i p_i @ W) / τ,
so forward stores those [N, H] directions while p is at hand and backward is a row scaling:
2 matmuls in all instead of 3 (Liger's fused linear cross-entropy precomputes its gradient
in forward the same way, for a scalar loss; per-token outputs work because each output
depends on its own row only).

Peers: Cut Cross-Entropy and Liger's fused linear cross-entropy (no entropy); verl's
chunked entropy; TRL's ``selective_log_softmax`` + ``entropy_from_logits`` and, since TRL
1.16, ``trl.kernels.ChunkedLogProbFunction`` (tiles over tokens and vocabulary, matmul in
the autocast/input dtype). Memory here: two [C, V] fp32
workspaces (reused across chunks, so the allocator never faults in fresh pages), the
fp32 gradient of W [V, H] when W trains, an fp32 copy of W when W is not fp32, and
[N]-sized outputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["DEFAULT_CHUNK_SIZE", "TokenStatsOut", "naive_token_stats", "stats_from_logits", "token_stats"]

# Rows per chunk. Measured on CPU (benchmarks/RESULTS_token_stats.md): 256-2048 run at the
# same speed within noise, and memory grows as 2·C·V·4 bytes, so 1024 keeps the workspace at
# 256 MiB for V = 32k and 1.2 GiB for V = 152k.
DEFAULT_CHUNK_SIZE = 1024


class TokenStatsOut(NamedTuple):
    """Per-token statistics, all fp32 and shaped like ``targets`` ([N] or [B, T])."""

    logprobs: torch.Tensor  # log π(target), differentiable
    entropy: torch.Tensor | None  # −Σ π log π (nats); differentiable only with entropy_grad=True
    collision: torch.Tensor | None  # Σ π², detached


# --------------------------------------------------------------------------------------------
# argument checks and flattening (shared by the chunked and the naive path)


def _check_args(hidden, weight, targets, temperature, chunk_size, bias):
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor [..., H], got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids (long), got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())  # one sync; out-of-range ids would gather garbage
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, V) = [0, {weight.shape[0]}), got range [{lo}, {hi}]")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (the gradcheck reference)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return x if x is None or x.dtype == dtype else x.to(dtype)


# --------------------------------------------------------------------------------------------
# per-chunk kernels (plain tensor functions, so they can be torch.compile'd)


def _chunk_logits(h, w32, b32, inv_temp, out):
    """z = (h/τ) @ W.T + b/τ into ``out`` [C, V] (fp32)."""
    hs = h.to(out.dtype) * inv_temp  # [C, H]; scaling h is V/H times cheaper than scaling z
    if b32 is None:
        return torch.mm(hs, w32.t(), out=out)
    return torch.addmm(b32 * inv_temp, hs, w32.t(), out=out)


def _chunk_forward(h, w32, b32, t, inv_temp, with_entropy, with_collision, want_p, buf, ebuf):
    """Stats of one chunk. Returns (logprob, lse, entropy|None, collision|None, p|None) with p in ebuf."""
    z = _chunk_logits(h, w32, b32, inv_temp, buf)  # [C, V]
    m = z.amax(dim=1, keepdim=True)  # [C, 1]
    z_t = z.gather(1, t[:, None])  # [C, 1]
    z.sub_(m)  # x = z − m ≤ 0
    e = torch.exp(z, out=ebuf)  # [C, V] unnormalised probabilities
    s = e.sum(dim=1, keepdim=True)  # [C, 1]
    log_s = s.log()
    lse = (m + log_s).squeeze(1)  # [C]
    logprob = (z_t - m - log_s).squeeze(1)  # [C]
    entropy = collision = None
    if with_collision:
        # Σ p² = ‖e‖² / s²; vector_norm is a single fast reduction (no [C, V] temporary)
        collision = (torch.linalg.vector_norm(e, dim=1) ** 2 / s.squeeze(1) ** 2)
    if with_entropy:
        # H = log s − Σ e·x / s  (x = z − m); the product reuses buf in place
        entropy = (log_s - z.mul_(e).sum(dim=1, keepdim=True) / s).squeeze(1)
    p = e.div_(s) if want_p else None  # normalised in place, for the frozen-head gradient directions
    return logprob, lse, entropy, collision, p


def _chunk_backward(h, w32, b32, t, inv_temp, lse, entropy, g_lp, g_ent, g_h, g_w, g_b, buf, ebuf):
    """One chunk of backward: writes g_h [C, H] (if not None), accumulates g_w [V, H] and g_b [V].

    Without an entropy gradient, g_raw = diag(g/τ)(onehot − P) is never formed: its row
    scaling moves to the [C, H] side (V/H times cheaper), so the [C, V] buffer sees one exp:
        g_h = (g/τ) ⊙ (W[t] − P @ W),   g_W += onehot.T @ ((g/τ) ⊙ h) − P.T @ ((g/τ) ⊙ h)
    """
    z = _chunk_logits(h, w32, b32, inv_temp, buf)  # [C, V]
    z.sub_(lse[:, None])  # log p
    gl = g_lp * inv_temp  # [C]
    hf = h.to(z.dtype)  # [C, H]
    if g_ent is None:
        p = z.exp_()  # P in place
        if g_h is not None:
            torch.mm(p, w32, out=g_h)  # [C, H] = E_p[W]
            g_h.sub_(w32[t]).mul_(-gl[:, None])
        gh_rows = gl[:, None] * hf  # [C, H]
        if g_w is not None:
            g_w.addmm_(p.t(), gh_rows, alpha=-1.0)
            g_w.index_add_(0, t, gh_rows)
        if g_b is not None:
            g_b.addmv_(p.t(), gl, alpha=-1.0)
            g_b.index_add_(0, t, gl)
        return
    # entropy gradient: g_raw = g_lp·onehot/τ − P ⊙ (g_lp + g_H·(log P + H)) / τ, formed explicitly
    p = torch.exp(z, out=ebuf)
    g_raw = z.add_(entropy[:, None]).mul_((g_ent * inv_temp)[:, None]).add_(gl[:, None]).mul_(p).neg_()
    g_raw[torch.arange(z.shape[0], device=z.device), t] += gl
    if g_h is not None:
        torch.mm(g_raw, w32, out=g_h)
    if g_w is not None:
        g_w.addmm_(g_raw.t(), hf)
    if g_b is not None:
        g_b += g_raw.sum(0)


@functools.cache
def _kernels(compiled: bool):
    """(chunk forward, chunk backward), optionally through torch.compile (fuses the elementwise
    passes over the [C, V] buffer; compiled once per process, dynamic shapes after a recompile)."""
    if not compiled:
        return _chunk_forward, _chunk_backward
    return torch.compile(_chunk_forward), torch.compile(_chunk_backward)


# --------------------------------------------------------------------------------------------
# the autograd Function


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy, with_collision,
                entropy_grad, compiled):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n, v = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        entropy_grad = entropy_grad and with_entropy
        # frozen head: precompute the per-row gradient directions while p is at hand
        directions = need_h and not (need_w or need_b)
        f32 = {"device": hidden.device, "dtype": _compute_dtype(hidden, weight, bias)}
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 inside, whatever the caller's autocast
            w32, b32 = _cast(weight, f32["dtype"]), _cast(bias, f32["dtype"])
            c = max(1, min(int(chunk_size), n))
            buf, ebuf = torch.empty(c, v, **f32), torch.empty(c, v, **f32)  # reused workspaces
            logprobs, lse = torch.empty(n, **f32), torch.empty(n, **f32)
            entropy = torch.empty(n, **f32) if with_entropy else None
            collision = torch.empty(n, **f32) if with_collision else None
            a_lp = torch.empty(n, weight.shape[1], **f32) if directions else None  # ∂logprob_i/∂h_i
            a_ent = torch.empty(n, weight.shape[1], **f32) if directions and entropy_grad else None
            for i in range(0, n, c):
                j = min(i + c, n)
                k = j - i
                lp, ls, ent, col, p = _kernels(compiled)[0](
                    hidden[i:j], w32, b32, targets[i:j], inv_temp, with_entropy, with_collision,
                    directions, buf[:k], ebuf[:k],
                )
                logprobs[i:j], lse[i:j] = lp, ls
                if with_entropy:
                    entropy[i:j] = ent
                if with_collision:
                    collision[i:j] = col
                if directions:
                    pw = p @ w32  # [k, H] = E_p[W_v]
                    a_lp[i:j] = (w32[targets[i:j]] - pw) * inv_temp
                    if a_ent is not None:
                        # ∂H/∂h = −Σ_v p_v (log p_v + H) W_v / τ = −((p ⊙ log p) @ W + H·(p @ W)) / τ
                        plogp = p.mul_(torch.log(p, out=buf[:k]).nan_to_num_(neginf=0.0))
                        a_ent[i:j] = -(plogp @ w32 + ent[:, None] * pw) * inv_temp
            del buf, ebuf
        ctx.meta = (temperature, int(chunk_size), entropy_grad, directions, need_h, need_w, need_b, compiled)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if directions:
            ctx.save_for_backward(a_lp, a_ent)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if entropy_grad else None)
        # one call: a second mark_non_differentiable replaces the first
        ctx.mark_non_differentiable(*[x for x in (None if entropy_grad else entropy, collision) if x is not None])
        ctx.set_materialize_grads(False)
        return logprobs, entropy, collision

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_col):
        temperature, chunk_size, entropy_grad, directions, need_h, need_w, need_b, compiled = ctx.meta
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        g_ent = g_ent if entropy_grad else None
        if g_lp is None and g_ent is None:
            return (None,) * 10
        if directions:
            a_lp, a_ent = ctx.saved_tensors
            g_h = torch.zeros_like(a_lp)
            if g_lp is not None:
                g_h.addcmul_(g_lp.to(a_lp.dtype)[:, None], a_lp)
            if g_ent is not None:
                g_h.addcmul_(g_ent.to(a_lp.dtype)[:, None], a_ent)
            return (g_h.to(h_dtype),) + (None,) * 9

        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        f32 = {"device": hidden.device, "dtype": _compute_dtype(hidden, weight, bias)}
        g_lp = torch.zeros(n, **f32) if g_lp is None else g_lp.to(f32["dtype"])
        g_ent = _cast(g_ent, f32["dtype"])
        with torch.autocast(hidden.device.type, enabled=False):
            w32, b32 = _cast(weight, f32["dtype"]), _cast(bias, f32["dtype"])
            c = max(1, min(chunk_size, n))
            buf = torch.empty(c, v, **f32)
            ebuf = torch.empty(c, v, **f32) if g_ent is not None else None
            g_h = torch.empty(n, hidden.shape[1], **f32) if need_h else None
            # accumulate in fp32 even for bf16 weights; the result is cast once at the end
            g_w = torch.zeros_like(weight, dtype=f32["dtype"]) if need_w else None
            g_b = torch.zeros(v, **f32) if need_b else None
            for i in range(0, n, c):
                j = min(i + c, n)
                _kernels(compiled)[1](
                    hidden[i:j], w32, b32, targets[i:j], inv_temp, lse[i:j],
                    None if entropy is None else entropy[i:j], g_lp[i:j],
                    None if g_ent is None else g_ent[i:j], None if g_h is None else g_h[i:j], g_w, g_b,
                    buf[: j - i], None if ebuf is None else ebuf[: j - i],
                )
        return (
            None if g_h is None else g_h.to(h_dtype),
            None if g_w is None else g_w.to(w_dtype),
            None if g_b is None else g_b.to(b_dtype),
        ) + (None,) * 7


# --------------------------------------------------------------------------------------------
# public entry points


def token_stats(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    with_collision: bool = False,
    entropy_grad: bool = False,
    bias: torch.Tensor | None = None,
    compile: bool = False,
) -> TokenStatsOut:
    """Log π(target), entropy and Σπ² of softmax((hidden @ W.T + bias)/τ), chunked over rows.

    Shapes: hidden [..., H] (any float dtype), lm_head_weight [V, H], targets [...] (long),
    bias [V] | None. Outputs are fp32 and shaped like ``targets``. Never holds the logits of
    more than ``chunk_size`` rows; backward recomputes them per chunk (or, when only
    ``hidden`` needs a gradient, uses [N, H] directions computed in forward). Gradients
    flow through ``logprobs`` into hidden, weight and bias (returned in their dtypes);
    ``entropy`` is detached unless ``entropy_grad=True``; ``collision`` is always detached.
    ``compile=True`` runs the per-chunk kernels through ``torch.compile`` (worth it on GPU).
    """
    _check_args(hidden, lm_head_weight, targets, temperature, chunk_size, bias)
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    t1 = targets.reshape(-1).long()  # [N]
    lp, ent, col = _TokenStatsFn.apply(
        h2, lm_head_weight, bias, t1, float(temperature), int(chunk_size), bool(with_entropy),
        bool(with_collision), bool(entropy_grad), bool(compile),
    )
    return TokenStatsOut(
        lp.reshape(lead),
        None if ent is None else ent.reshape(lead),
        None if col is None else col.reshape(lead),
    )


def stats_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    with_collision: bool = False,
    entropy_grad: bool = False,
) -> TokenStatsOut:
    """The plain path on given logits [..., V]: fp32 log_softmax(logits/τ), gather, entropy, Σπ².

    Holds several [..., V] fp32 tensors; the reference for ``token_stats`` and the fallback of
    ``model_token_stats`` when a model's head cannot be split off.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    z = _cast(logits, _compute_dtype(logits))  # [..., V] fp32 (fp64 stays fp64)
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [...]
    entropy = collision = None
    if with_entropy or with_collision:
        src = logp if entropy_grad else logp.detach()
        p = src.exp()
        if with_entropy:
            entropy = -(p * src).sum(-1)
        if with_collision:
            collision = (p * p).sum(-1).detach()
    return TokenStatsOut(logprobs, entropy, collision)


def naive_token_stats(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,  # accepted for a drop-in signature; unused
    with_entropy: bool = True,
    with_collision: bool = False,
    entropy_grad: bool = False,
    bias: torch.Tensor | None = None,
    compile: bool = False,
) -> TokenStatsOut:
    """Reference / fallback with ``token_stats``'s signature: full fp32 logits [..., V], then
    ``stats_from_logits``. Same outputs and gradients, O(N·V) memory."""
    _check_args(hidden, lm_head_weight, targets, temperature, chunk_size, bias)
    dtype = _compute_dtype(hidden, lm_head_weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(  # [..., V]
            hidden.to(dtype), lm_head_weight.to(dtype), _cast(bias, dtype)
        )
        return stats_from_logits(
            logits, targets, temperature=temperature, with_entropy=with_entropy,
            with_collision=with_collision, entropy_grad=entropy_grad,
        )
