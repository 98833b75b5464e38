"""Rollout dumps: one parquet file per dumped step, one row per response token.

Layout: ``RUN_DIR/rollouts/step_000010.parquet`` (``rollout_path``). Columns:

    step, seq, group, pos, token_id, piece         which token (piece = the token decoded alone)
    prompt, reward                                  per sequence, repeated on its tokens
    p, logprob, entropy, collision, advantage, ratio, weight   p, H, Σπ², A, ρ, w (0 if clipped)
    grad_norm                                       exact ‖∇_z J‖ = |w| √(1 − 2p + Σπ²)
    dh_natural, dh_exact                            first-order ΔH per unit step (paper / exact; exact
                                                    is null without Σπ² log π)
    entropy_up_paper                                p < e^{−H}
    valid, candidate, silenced, entropy20_kept      mask decisions (entropy20_kept null if not given)
    selected                                        tokens the training objective acted on (its
                                                    metadata ``action``: silenced, kept, detached,
                                                    penalised); null for an objective that selects none
    quadrant                                        one of QUADRANTS, null unless valid with A > 0

Rows cover every real response token: positions up to the later of the last valid
(``response_mask``) token and the last non-pad token, so responses that the loss
masks out (e.g. overlong ones) still appear with ``valid = false``. The file's
schema metadata (key ``stapo``) holds the settings and the τ_h used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..objectives.masks import QUANTILE, TAU_P
from .metrics import QUADRANTS, DiagnosticsConfig, token_fields

__all__ = ["ROLLOUT_DIR", "dump_rollouts", "list_dumps", "read_rollouts", "rollout_path", "rollout_table"]

ROLLOUT_DIR = "rollouts"
_NAME = re.compile(r"^step_(\d+)\.parquet$")


def rollout_path(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/rollouts/step_{step:06d}.parquet``."""
    return Path(run_dir) / ROLLOUT_DIR / f"step_{int(step):06d}.parquet"


def list_dumps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every dump under ``RUN_DIR/rollouts``, by step."""
    folder = Path(run_dir) / ROLLOUT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def read_rollouts(path: str | Path):
    """One dump (a file) or all dumps of a run (a run directory) as one ``pyarrow.Table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    files = [path] if path.is_file() else [p for _, p in list_dumps(path)]
    if not files:
        raise FileNotFoundError(f"no rollout dumps: {path} is not a parquet file and has no {ROLLOUT_DIR}/step_*.parquet")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"cannot read rollout dump {f}: {err}") from err
    return pa.concat_tables(tables, promote_options="default")


def _lengths(response_ids: torch.Tensor, response_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B] number of real tokens per row: past the last valid token and the last non-pad token."""
    t = torch.arange(1, response_ids.shape[1] + 1)  # [T]
    real = response_mask.bool().cpu()
    if pad_token_id is not None:
        real = real | (response_ids.cpu() != pad_token_id)
    return (real * t).amax(dim=1)  # [B]


def _pieces(tokenizer, ids: list[int]) -> dict[int, str]:
    """Each distinct id decoded on its own (readable; a lone byte-level fragment may decode as U+FFFD)."""
    return {i: tokenizer.decode([i], skip_special_tokens=False) for i in sorted(set(ids))}


def _prompts(batch, tokenizer) -> list[str | None]:
    if batch.prompt_ids is None:
        return [None] * len(batch)
    out = []
    for ids, mask in zip(batch.prompt_ids.cpu(), batch.prompt_mask.cpu().bool()):
        out.append(tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False))
    return out


def rollout_table(
    batch,
    *,
    step: int,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    tokenizer,
    p2logp: torch.Tensor | None = None,
    silenced: torch.Tensor | None = None,
    entropy20_kept: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    action: str | None = None,
    vocab_size: int | None = None,
    prob_threshold: float = TAU_P,
    entropy_threshold: float | None = None,
    entropy_quantile: float = QUANTILE,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
):
    """The per-token ``pyarrow.Table`` of ``dump_rollouts`` (same arguments, without the path)."""
    import pyarrow as pa

    if batch.advantages is None:
        raise ValueError("batch.advantages is None: compute advantages before dumping rollouts")
    if logprobs.shape != batch.response_ids.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != batch.response_ids shape "
                         f"{tuple(batch.response_ids.shape)}")
    for name, mask in (("entropy20_kept", entropy20_kept), ("selected", selected)):
        if mask is not None and mask.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    # without old log-probs the dump is on-policy: ρ = 1
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs
    cfg = DiagnosticsConfig(vocab_size or len(tokenizer), prob_threshold, entropy_quantile, entropy_threshold,
                            clip_low, clip_high, clip_ratio_c)
    def cpu(x):
        return None if x is None else x.detach().cpu()

    f = token_fields(cpu(logprobs), cpu(entropy), cpu(collision), cpu(batch.advantages), cpu(old),
                     cpu(batch.response_mask), cfg, silenced=cpu(silenced), p2logp=cpu(p2logp))
    ids = batch.response_ids.cpu()
    lengths = _lengths(ids, batch.response_mask, tokenizer.pad_token_id)  # [B]
    keep = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    seq, pos = keep.nonzero(as_tuple=True)  # row-major: tokens of a sequence in order

    def col(x, dtype=None):
        values = x.detach().cpu()[seq, pos]
        return values.to(dtype) if dtype is not None else values

    token_ids = col(ids).tolist()
    pieces = _pieces(tokenizer, token_ids)
    seq_list = seq.tolist()
    prompts = _prompts(batch, tokenizer)
    quad = col(f.quadrant).tolist()
    columns = {
        "step": pa.array([int(step)] * len(seq_list), pa.int32()),
        "seq": pa.array(seq_list, pa.int32()),
        "group": pa.array([int(batch.group_ids[s]) for s in seq_list], pa.int32()),
        "pos": pa.array(pos.tolist(), pa.int32()),
        "token_id": pa.array(token_ids, pa.int32()),
        "piece": pa.array([pieces[i] for i in token_ids], pa.string()),
        "prompt": pa.array([prompts[s] for s in seq_list], pa.string()).dictionary_encode(),
        "reward": pa.array(
            [float(batch.rewards[s]) for s in seq_list] if batch.rewards is not None else [None] * len(seq_list),
            pa.float32(),
        ),
        "p": pa.array(col(f.prob, torch.float32).numpy()),
        "logprob": pa.array(col(logprobs, torch.float32).numpy()),
        "entropy": pa.array(col(entropy, torch.float32).numpy()),
        "collision": pa.array(col(collision, torch.float32).numpy()),
        "advantage": pa.array(col(f.advantage, torch.float32).numpy()),
        "ratio": pa.array(col(f.ratio, torch.float32).numpy()),
        "weight": pa.array(col(f.weight, torch.float32).numpy()),
        "grad_norm": pa.array(col(f.grad_norm, torch.float32).numpy()),
        "dh_natural": pa.array(col(f.dh_natural, torch.float32).numpy()),
        "dh_exact": (pa.array(col(f.dh_exact, torch.float32).numpy()) if f.dh_exact is not None
                     else pa.nulls(len(seq_list), pa.float32())),
        "entropy_up_paper": pa.array(col(f.entropy_up_paper).numpy()),
        "valid": pa.array(col(f.valid).numpy()),
        "candidate": pa.array(col(f.candidate).numpy()),
        "silenced": pa.array(col(f.silenced).numpy()),
        "entropy20_kept": (pa.array(col(entropy20_kept.bool()).numpy()) if entropy20_kept is not None
                           else pa.nulls(len(seq_list), pa.bool_())),
        "selected": (pa.array(col(selected.bool()).numpy()) if selected is not None
                     else pa.nulls(len(seq_list), pa.bool_())),
        "quadrant": pa.array([QUADRANTS[q] if q >= 0 else None for q in quad], pa.string()),
    }
    meta = {
        "step": int(step),
        "vocab_size": cfg.vocab_size,
        "prob_threshold": prob_threshold,
        "entropy_quantile": entropy_quantile,
        "entropy_threshold": f.entropy_threshold,  # τ_h actually used (nan: no positive token)
        "clip_low": clip_low,
        "clip_high": clip_high,
        "clip_ratio_c": clip_ratio_c,
        "action": action if selected is not None else None,  # what the objective did to `selected`
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({"stapo": json.dumps(meta)})


def dump_rollouts(path: str | Path, batch, *, step: int, logprobs, entropy, collision, tokenizer, **kwargs) -> Path:
    """Write the step's per-token table (see the module docstring) to ``path`` (parquet, zstd).

    Shapes: ``batch`` a ``stapo.batch.RolloutBatch`` with ``advantages`` ([B] or [B, T]) set and, for
    ρ ≠ 1, ``old_logprobs`` [B, T]; ``logprobs``, ``entropy``, ``collision`` (Σπ²) [B, T] of the
    current policy. Optional keyword tensors [B, T]: ``p2logp`` (Σπ² log π, for ``dh_exact``),
    ``silenced`` (the trainer's S2T mask; computed with the settings when None), ``entropy20_kept``,
    ``selected`` (the tokens the objective acted on, with its ``action`` word).
    Settings (``prob_threshold``, ``entropy_threshold``, ``entropy_quantile``, clip constants,
    ``vocab_size`` = len(tokenizer) by default) as ``token_diagnostics``. ``path`` may be a run
    directory, in which case the file is ``rollout_path(path, step)``. Returns the file written.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet":
        path = rollout_path(path, step)
    table = rollout_table(batch, step=step, logprobs=logprobs, entropy=entropy, collision=collision,
                          tokenizer=tokenizer, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
    except OSError as err:  # pyarrow names no file (and removes the torn one)
        raise OSError(err.errno, os.strerror(err.errno), str(path)) from None
    tmp.replace(path)  # readers (a live `stapo analyze`) never see a half-written file
    return path
