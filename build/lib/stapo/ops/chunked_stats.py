"""Per-token log-prob, entropy and collision probability without holding [N, V] logits.

Notation (shapes):
    N rows (tokens; leading dims of ``hidden`` are flattened), H hidden size, V vocabulary,
    τ = temperature, tiles [R, Vb] of the logits with R·Vb = chunk_size·V, R = Vb ≈ √(chunk_size·V).

    hidden  [N, H] (any float dtype)    weight [V, H]    bias [V] | None    targets [N] long
    z       = (hidden @ weight.T + bias) / τ           one [R, Vb] tile at a time, never [N, V]
    lse     = logsumexp_v z                             [N]   (saved for backward)
    logprob = z[target] − lse                           [N]
    entropy = −Σ_v p_v log p_v = lse − Σ_v p_v z_v      [N]
    collision = Σ_v p_v²                                [N]   (always detached)

Forward folds the vocabulary tiles of a row tile into running statistics (max m, Σe, Σe·(z−m),
Σe², with e = exp(z − m), rescaled when m grows: the online softmax of flash attention and of
TRL's ``ChunkedLogProbFunction``).

Backward (per tile, logits recomputed from the saved lse; g = upstream grads):
    ∂logprob/∂z = onehot(target) − p
    ∂entropy/∂z = −p ⊙ (log p + H)       (from H = lse − Σ_v p_v z_v)
    g_raw = [g_lp·onehot − p ⊙ (g_lp + g_H·(log p + H))] / τ
    g_hidden = g_raw @ W;   g_W += g_raw.T @ hidden;   g_bias += Σ_rows g_raw
Without an entropy gradient the row scaling g_lp/τ is applied on the [R, H] side
(g_hidden = (g_lp/τ) ⊙ (W[t] − P @ W)), so the [R, Vb] buffer only sees one exp; the one-hot
part is an index_add per row tile.

Frozen head (only ``hidden`` needs a gradient: LoRA, or a frozen lm_head): row i's
gradient is its upstream scalar times a vector fixed at forward time,
    ∂logprob_i/∂h_i = (W[t_i] − p_i @ W) / τ,   ∂H_i/∂h_i = −((p_i ⊙ log p_i) @ W + H_i p_i @ W) / τ,
so forward accumulates those [N, H] directions tile by tile and backward is a row scaling:
2 GEMMs in all instead of 3 (Liger's fused linear cross-entropy precomputes its gradient in
forward the same way, for a scalar loss; per-token outputs work because each output depends
on its own row only). With a trainable head it is 4 GEMMs (forward, recompute, two gradient
GEMMs) against the naive path's 3.

Precision: each tile is computed in fp32 (fp64 for fp64 inputs) with autocast disabled, so
bf16 inputs give fp32-accurate statistics; gradients come back in the inputs' dtypes, g_W
accumulated in fp32. Memory: two R·Vb workspaces (reused across tiles, so the allocator never
faults in fresh pages), a few [R, H] and [N]-sized tensors, the fp32 g_W [V, H] when W trains,
and an fp32 copy of W when W is not fp32.

Peers: Cut Cross-Entropy and Liger's fused linear cross-entropy (no entropy); verl's chunked
entropy; TRL's ``selective_log_softmax`` + ``entropy_from_logits`` and, since TRL 1.16,
``trl.kernels.ChunkedLogProbFunction`` (tiles over tokens and vocabulary, GEMM in the
autocast/input dtype).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

__all__ = ["DEFAULT_CHUNK_SIZE", "TokenStatsOut", "naive_token_stats", "stats_from_logits", "token_stats"]

# Workspace size in rows of full-vocabulary logits: each of the two tile buffers holds
# chunk_size·V fp32 values (16 MiB at V = 32k, 74 MiB at V = 152k). Chosen by measurement
# (benchmarks/RESULTS_token_stats.md, N = 4k, V = 32k, one thread, chunk sweep): peak memory
# grows with the chunk while the time does not improve, and 128 keeps the ≤ 1/8 goal with room.
DEFAULT_CHUNK_SIZE = 128


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
# tiles: [R rows, Vb vocabulary] blocks of the logits, R·Vb = chunk_size·V elements


def _tile_shape(n: int, v: int, chunk_size: int) -> tuple[int, int]:
    """Tile [R, Vb] holding chunk_size·V elements (what chunk_size full rows of logits would hold).

    Backward re-reads the g_W accumulator [V, H] once per row tile (N/R times) and the g_h
    accumulator [R, H] once per vocabulary tile (V/Vb times); R = Vb = √budget balances
    the two and keeps every GEMM dimension large (chunks of a few hundred full rows ran
    25-50 % slower on CPU, because each re-streams W for a thin GEMM).
    """
    budget = max(1, chunk_size) * v
    rows = max(1, min(n, math.isqrt(budget)))
    return rows, min(v, max(1, budget // rows))


def _tile_logits(hs, w_blk, bs_blk, out):
    """out [R, Vb] = hs @ w_blk.T + bs_blk, with hs = h/τ and bs = b/τ already scaled."""
    if bs_blk is None:
        return torch.mm(hs, w_blk.t(), out=out)
    return torch.addmm(bs_blk, hs, w_blk.t(), out=out)


def _tile_forward(hs, w_blk, bs_blk, t_local, st, with_entropy, with_collision, buf, ebuf):
    """Fold one [R, Vb] tile into the online-softmax state ``st`` (flash-attention style).

    State per row, relative to the running max m:  s = Σ e,  A = Σ e·(z − m),  Q = Σ e²,
    e = exp(z − m); U = Σ e·W_v and Y = Σ e·(z − m)·W_v [R, H] for the frozen-head directions.
    A new max m' rescales by α = exp(m − m'):  s ← αs,  Q ← α²Q,  A ← α(A + (m − m')s),
    U ← αU,  Y ← α(Y + (m − m')U).  t_local = target − tile start (out of range: not here).
    """
    z = _tile_logits(hs, w_blk, bs_blk, buf)  # [R, Vb] = z/τ
    here = (t_local >= 0) & (t_local < z.shape[1])
    z_t = z.gather(1, t_local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    st["z_t"] = torch.where(here, z_t, st["z_t"])
    m_new = torch.maximum(st["m"], z.amax(dim=1))  # [R]
    shift = st["m"] - m_new  # ≤ 0; m starts at finfo.min, so the first tile gets α = 0, shift·s = 0
    alpha = shift.exp()
    st["A"] = alpha * (st["A"] + shift * st["s"])
    st["s"] = alpha * st["s"]
    st["Q"] = alpha * alpha * st["Q"]
    if "U" in st:
        if "Y" in st:
            st["Y"] = (st["Y"] + shift[:, None] * st["U"]).mul_(alpha[:, None])
        st["U"].mul_(alpha[:, None])
    st["m"] = m_new
    z.sub_(m_new[:, None])  # x = z − m ≤ 0
    e = torch.exp(z, out=ebuf)  # [R, Vb]
    st["s"] = st["s"] + e.sum(dim=1)
    if with_collision:
        st["Q"] = st["Q"] + torch.linalg.vector_norm(e, dim=1) ** 2  # one reduction, no temporary
    if "U" in st:
        st["U"].addmm_(e, w_blk)
    if with_entropy:
        ex = z.mul_(e)  # e·x in place of x
        st["A"] = st["A"] + ex.sum(dim=1)
        if "Y" in st:
            st["Y"].addmm_(ex, w_blk)


def _tile_backward(hs, h32, w_blk, bs_blk, lse, entropy, gl, gh_s, glh, acc, g_w_blk, g_b_blk, buf, ebuf):
    """Backward of one [R, Vb] tile, logits recomputed from the saved lse.

    lse, entropy, gl = g_lp/τ, gh_s = g_H/τ [R]; glh = gl ⊙ h [R, H]. With this tile of g_raw
    minus its one-hot part, R_t = −P ⊙ (gl + gh_s·(log P + H)), it accumulates
        acc += R_t @ W_blk [R, H],   g_W[blk] += R_t.T @ h,   g_b[blk] += Σ_rows R_t;
    the one-hot part (gl at the target) is added once by the caller. Without an entropy
    gradient R_t = −diag(gl)·P and the row scaling moves to the [R, H] side (glh, and the
    caller scales acc by −gl), so the [R, Vb] buffer sees a single exp.
    """
    z = _tile_logits(hs, w_blk, bs_blk, buf)  # [R, Vb]
    z.sub_(lse[:, None])  # log P
    if gh_s is None:
        p = z.exp_()  # P in place
        if acc is not None:
            acc.addmm_(p, w_blk)
        if g_w_blk is not None:
            g_w_blk.addmm_(p.t(), glh, alpha=-1.0)
        if g_b_blk is not None:
            g_b_blk.addmv_(p.t(), gl, alpha=-1.0)
        return
    p = torch.exp(z, out=ebuf)
    r = z.add_(entropy[:, None]).mul_(gh_s[:, None]).add_(gl[:, None]).mul_(p).neg_()  # R_t in place
    if acc is not None:
        acc.addmm_(r, w_blk)
    if g_w_blk is not None:
        g_w_blk.addmm_(r.t(), h32)
    if g_b_blk is not None:
        g_b_blk.add_(r.sum(0))


@functools.cache
def _kernels(compiled: bool):
    """(tile forward, tile backward), optionally through torch.compile (fuses the elementwise
    passes over the [R, Vb] buffer; compiled once per process, dynamic shapes after a recompile)."""
    if not compiled:
        return _tile_forward, _tile_backward
    return torch.compile(_tile_forward), torch.compile(_tile_backward)


def _tiles(n, v, chunk_size, two_buffers, **f32):
    """Yield (i, j, a, b, buf, ebuf) over row tiles [i:j] and vocabulary tiles [a:b].

    Buffers are flat and reused, so a ragged tile is a contiguous view and the allocator
    never faults in fresh pages per tile."""
    rows, vb = _tile_shape(n, v, chunk_size)
    ws = torch.empty(rows * vb, **f32)
    ews = torch.empty(rows * vb, **f32) if two_buffers else None
    for i in range(0, n, rows):
        j = min(i + rows, n)
        for a in range(0, v, vb):
            b = min(a + vb, v)
            k = (j - i) * (b - a)
            yield i, j, a, b, ws[:k].view(j - i, b - a), None if ews is None else ews[:k].view(j - i, b - a)


def _scaled(hidden_rows, inv_temp, dtype):
    """(h in the compute dtype, h/τ): copies only when needed."""
    h = hidden_rows.to(dtype)
    return h, (h * inv_temp if inv_temp != 1.0 else h)


# --------------------------------------------------------------------------------------------
# the autograd Function


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy, with_collision,
                entropy_grad, compiled):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n, v, hdim = hidden.shape[0], weight.shape[0], weight.shape[1]
        inv_temp = 1.0 / temperature
        entropy_grad = entropy_grad and with_entropy
        # frozen head: accumulate the per-row gradient directions while each tile's e is at hand
        directions = need_h and not (need_w or need_b)
        f32 = {"device": hidden.device, "dtype": _compute_dtype(hidden, weight, bias)}
        tile_forward = _kernels(compiled)[0]
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 inside, whatever the caller's autocast
            w32, b32 = _cast(weight, f32["dtype"]), _cast(bias, f32["dtype"])
            bs = None if b32 is None else b32 * inv_temp
            lse, logprobs = torch.empty(n, **f32), torch.empty(n, **f32)
            entropy = torch.empty(n, **f32) if with_entropy else None
            collision = torch.empty(n, **f32) if with_collision else None
            a_lp = torch.empty(n, hdim, **f32) if directions else None  # ∂logprob_i/∂h_i
            a_ent = torch.empty(n, hdim, **f32) if directions and entropy_grad else None  # ∂H_i/∂h_i
            st, hs = None, None
            for i, j, a, b, buf, ebuf in _tiles(n, v, chunk_size, True, **f32):
                if a == 0:  # a new row tile
                    _, hs = _scaled(hidden[i:j], inv_temp, f32["dtype"])
                    r = j - i
                    st = {k: torch.zeros(r, **f32) for k in ("s", "A", "Q", "z_t")}
                    st["m"] = torch.full((r,), torch.finfo(f32["dtype"]).min, **f32)
                    if directions:
                        st["U"] = torch.zeros(r, hdim, **f32)
                        if entropy_grad:
                            st["Y"] = torch.zeros(r, hdim, **f32)
                tile_forward(hs, w32[a:b], None if bs is None else bs[a:b], targets[i:j] - a, st,
                             with_entropy, with_collision, buf, ebuf)
                if b == v:  # row tile done: finish its statistics
                    log_s = st["s"].log()
                    lse[i:j] = st["m"] + log_s
                    logprobs[i:j] = st["z_t"] - lse[i:j]
                    if with_entropy:
                        entropy[i:j] = log_s - st["A"] / st["s"]  # H = log s − Σ e·x / s
                    if with_collision:
                        collision[i:j] = st["Q"] / st["s"] ** 2  # Σ p² = Σ e² / s²
                    if directions:
                        pw = st["U"] / st["s"][:, None]  # P @ W  [r, H]
                        a_lp[i:j] = (w32[targets[i:j]] - pw) * inv_temp
                        if entropy_grad:
                            # (P ⊙ log P) @ W = Y/s − log s · P@W;  ∂H/∂h = −((P ⊙ log P) @ W + H·P@W)/τ
                            plogp_w = st["Y"] / st["s"][:, None] - log_s[:, None] * pw
                            a_ent[i:j] = -(plogp_w + entropy[i:j, None] * pw) * inv_temp
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
        if directions:  # g_h = g_lp ⊙ ∂logprob/∂h + g_H ⊙ ∂H/∂h, row by row
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
        gl = (torch.zeros(n, **f32) if g_lp is None else g_lp.to(f32["dtype"])) * inv_temp  # [N]
        gh_s = None if g_ent is None else g_ent.to(f32["dtype"]) * inv_temp
        tile_backward = _kernels(compiled)[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w32, b32 = _cast(weight, f32["dtype"]), _cast(bias, f32["dtype"])
            bs = None if b32 is None else b32 * inv_temp
            g_h = torch.empty(n, hidden.shape[1], **f32) if need_h else None
            # accumulate in fp32 even for bf16 weights; the result is cast once at the end
            g_w = torch.zeros_like(weight, dtype=f32["dtype"]) if need_w else None
            g_b = torch.zeros(v, **f32) if need_b else None
            h32 = hs = glh = acc = None
            for i, j, a, b, buf, ebuf in _tiles(n, v, chunk_size, gh_s is not None, **f32):
                if a == 0:
                    h32, hs = _scaled(hidden[i:j], inv_temp, f32["dtype"])
                    glh = gl[i:j, None] * h32  # [r, H]
                    acc = g_h[i:j].zero_() if need_h else None  # Σ_tiles R_t @ W, built in place
                tile_backward(
                    hs, h32, w32[a:b], None if bs is None else bs[a:b], lse[i:j],
                    None if entropy is None else entropy[i:j], gl[i:j],
                    None if gh_s is None else gh_s[i:j], glh, acc,
                    None if g_w is None else g_w[a:b], None if g_b is None else g_b[a:b], buf, ebuf,
                )
                if b < v:
                    continue
                # row tile done: add the one-hot parts, g_h += gl ⊙ W[t], g_W[t] += gl ⊙ h
                if need_h:
                    if gh_s is None:
                        acc.mul_(-gl[i:j, None])
                    acc.add_(w32[targets[i:j]].mul_(gl[i:j, None]))
                if need_w:
                    g_w.index_add_(0, targets[i:j], glh)
            if need_b:
                g_b.index_add_(0, targets, gl)
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
