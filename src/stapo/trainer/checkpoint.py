"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for the rest.

Layout of ``RUN_DIR/checkpoints/step_000010/``:
    policy/                     save_pretrained model (or PEFT adapter) + tokenizer, safetensors
    dcp/                        FSDP2 only: sharded model + optimizer (torch.distributed.checkpoint)
    trainer_state/tensors.safetensors   optimizer moments, RNG states
    trainer_state/state.json    step, data cursor, scheduler, optimizer hyper-parameters, counters
    manifest.json               size and sha256 of every other file

A checkpoint is written into a hidden temp directory and renamed into place, so a
crash mid-save leaves the previous checkpoint intact and no half-written one visible.
The manifest catches what the rename cannot: a file truncated, or bytes flipped, after the
save (a full disk, a bad copy, bit rot). ``resume_checkpoint`` uses the newest checkpoint
that matches its manifest and moves the newer corrupt ones aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ..distributed import LOCAL, DistContext, all_reduce_sum, barrier, unwrap
from ..errors import UserError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
# test hook: "after_policy" simulates a crash mid-save; "enospc" a full disk (the state file is written
# to /dev/full, so the kernel itself answers ENOSPC)
_FAULT_ENV = "STAPO_CHECKPOINT_FAULT"


class CheckpointError(UserError):
    """No usable checkpoint: none saved, or every one fails its manifest; the message names the files."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict[str, Any],
    keep_last: int = 2,
    ctx: DistContext = LOCAL,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep_last``.

    Every rank calls this. Under FSDP2 each rank writes its shards of the model and
    optimizer with torch.distributed.checkpoint (``dcp/``); rank 0 also exports the
    consolidated policy for evaluation. Every rank's RNG state is kept, for exact resume.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    bad = nonfinite_parameters(model)
    if all_reduce_sum(len(bad)):  # every rank stops; a checkpoint that cannot train again is never written
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"checkpoint step {step} not saved: the weights hold non-finite values"
            + (f" ({', '.join(bad[:2])}{' and more' if len(bad) > 2 else ''})" if bad else "") + "; the run stops; "
            + (f"the previous checkpoint {previous.name} is intact: lower optim.lr, then "
               f"`stapo train --resume {run_dir} optim.lr=...`" if previous else "no earlier checkpoint exists")
        )
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
    barrier()
    rng_states = _gather_rng_states()
    if ctx.strategy == "fsdp2":
        _save_sharded(tmp, model, optimizer)
        weights = _full_model_state(model)
    else:
        weights = None
    if ctx.is_main:
        try:
            _write_checkpoint(tmp, step, model, tokenizer, optimizer, scheduler, state, weights, rng_states, ctx)
        except (OSError, SafetensorError) as err:  # a full disk, a quota, an I/O error: the previous one stands
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(run_dir)
            raise CheckpointError(
                f"checkpoint step {step} not saved: {_why(err)}; removed the partial {tmp.name}; "
                + (f"the previous checkpoint {previous.name} is intact: free space, then "
                   f"`stapo train --resume {run_dir}`" if previous else "no earlier checkpoint exists")
            ) from None
        if final.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-step_{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for stale in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _write_checkpoint(tmp: Path, step: int, model, tokenizer, optimizer, scheduler, state, weights,
                      rng_states, ctx: DistContext) -> None:
    """Rank 0's files of checkpoint ``step``, into ``tmp``."""
    unwrap(model).save_pretrained(tmp / "policy", safe_serialization=True, state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "policy")
    if os.environ.get(_FAULT_ENV) == "after_policy":
        os._exit(17)  # simulated kill in the middle of a save
    if os.environ.get(_FAULT_ENV) == "enospc":
        os.symlink("/dev/full", tmp / "trainer_state" / "state.json")
    tensors, opt_meta = ({}, None) if ctx.strategy == "fsdp2" else _optimizer_to_flat(optimizer)
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.torch.{rank}"] = rng["torch"]
        for i, s in enumerate(rng["cuda"]):
            tensors[f"rng.cuda.{rank}.{i}"] = s
    save_file(tensors, str(tmp / "trainer_state" / "tensors.safetensors"))
    meta = {
        "step": step,
        "world_size": ctx.world_size,
        "strategy": ctx.strategy,
        "state": state,
        "optimizer": opt_meta,
        "scheduler": _scheduler_state(scheduler),
        "rng": [{"python": _jsonable(r["python"]), "numpy": _jsonable(r["numpy"])} for r in rng_states],
    }
    _write_json(tmp / "trainer_state" / "state.json", meta)
    _write_json(tmp / MANIFEST, {"step": step, "files": _file_digests(tmp)})
    _fsync_tree(tmp)


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} ({err.filename})" if err.filename else err.strerror
    return " ".join(str(err).split())


def verify_checkpoint(ckpt: str | Path) -> list[str]:
    """What is wrong with ``ckpt`` against its manifest ([] = intact): one entry per bad file.

    A checkpoint without a manifest (written before manifests existed) must hold its state file and
    its weights; one that lost both its manifest and its weights is not taken for such an old one.
    """
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        expected = manifest["files"]
    except FileNotFoundError:
        expected = None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [f"{MANIFEST}: unreadable"]
    if expected is None:
        problems = [] if (ckpt / "trainer_state" / "state.json").is_file() else ["trainer_state/state.json: missing"]
        if not (any((ckpt / "policy").glob("*.safetensors")) or (ckpt / "dcp").is_dir()):
            problems += [f"{MANIFEST}: missing", "policy/*.safetensors: missing"]
        return problems
    problems, to_hash = [], []
    for name, want in sorted(expected.items()):
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, expected {want['size']}")
        else:
            to_hash.append(name)
    with ThreadPoolExecutor(max_workers=min(8, len(to_hash) or 1)) as pool:
        digests = list(pool.map(_sha256, [ckpt / name for name in to_hash]))
    problems += [f"{name}: checksum mismatch" for name, d in zip(to_hash, digests) if d != expected[name]["sha256"]]
    return sorted(problems)


def resume_checkpoint(run_dir: str | Path, warn=print) -> Path:
    """The newest intact checkpoint of ``run_dir``; newer corrupt ones are reported through ``warn``
    and renamed to ``checkpoints/.corrupt-step_N`` so pruning and later resumes skip them."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint under {Path(run_dir) / 'checkpoints'} "
                              "(the run stopped before its first save); start it again without --resume")
    corrupt = []
    for ckpt in reversed(dirs):
        problems = verify_checkpoint(ckpt)
        if not problems:
            break
        corrupt.append((ckpt, problems))
    else:
        detail = "; ".join(f"{c.name}: {', '.join(p)}" for c, p in corrupt)
        raise CheckpointError(f"--resume {run_dir}: no intact checkpoint ({detail}); to start the run again, "
                              f"delete {Path(run_dir) / 'checkpoints'}")
    for bad, problems in corrupt:
        aside = bad.with_name(f".corrupt-{bad.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(bad, aside)
        warn(f"warning: checkpoint {bad.name} is corrupt ({', '.join(problems)}); moved it to "
             f"{aside} and resuming from {ckpt.name}")
    return ckpt


def load_trainer_state(ckpt: str | Path, optimizer: torch.optim.Optimizer, scheduler, model=None,
                       ctx: DistContext = LOCAL) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG states; return the saved ``state`` (with ``step``).

    The model's weights come from ``policy/`` (``setup.load_policy``), or under FSDP2 from
    the sharded ``dcp/`` (pass ``model``). A different world size resumes, but not bit-exactly:
    ranks beyond the saved ones start from rank 0's RNG state.
    """
    ckpt = Path(ckpt)
    meta_path = ckpt / "trainer_state" / "state.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete: missing {meta_path.name}")
    meta = json.loads(meta_path.read_text())
    # read into memory, not mapped: a mapped file would keep its disk space after pruning
    tensors = load((ckpt / "trainer_state" / "tensors.safetensors").read_bytes())
    if meta.get("strategy") == "fsdp2" or ctx.strategy == "fsdp2":
        if meta.get("strategy") != ctx.strategy:
            raise CheckpointError(f"checkpoint {ckpt} was written with parallel.strategy={meta.get('strategy')}; "
                             f"resume with the same strategy (got {ctx.strategy})")
        _load_sharded(ckpt, model, optimizer)
    else:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer"]))
    if scheduler is not None and meta.get("scheduler"):
        # lr_lambdas are functions rebuilt from the config; None entries keep the current ones
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rank = ctx.rank if ctx.rank < len(meta["rng"]) else 0
    torch.set_rng_state(tensors[f"rng.torch.{rank}"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith(f"rng.cuda.{rank}.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tuplify(meta["rng"][rank]["python"]))
    np_state = meta["rng"][rank]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return {"step": meta["step"], **meta["state"]}


def nonfinite_parameters(model) -> list[str]:
    """Names of this rank's parameters (its shards, under FSDP2) holding a NaN or an infinity."""
    named = list(unwrap(model).named_parameters())
    if not named:
        return []
    with torch.no_grad():  # one flag per tensor, then one device-to-host copy (checked after every update)
        finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                              for _, p in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def release_mapped_files(model) -> None:
    """``from_pretrained`` maps the checkpoint's safetensors, and on the CPU the parameters stay views of
    that map: pruning the checkpoint later would free no disk. Copy them into the process's memory."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # tied weights: one Parameter, copied once
            if t.device.type == "cpu":
                t.data = t.data.clone()


def _gather_rng_states() -> list[dict]:
    local = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def _save_sharded(tmp: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))


def _load_sharded(ckpt: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _full_model_state(model) -> dict[str, torch.Tensor] | None:
    """The consolidated weights on rank 0 (None elsewhere), for the exported ``policy/``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


# --- helpers ---------------------------------------------------------------------------------

def _optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _scheduler_state(scheduler) -> dict | None:
    if scheduler is None:
        return None
    sd = scheduler.state_dict()
    sd.pop("lr_lambdas", None)  # functions are rebuilt from the config, never serialised
    return _jsonable(sd)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _tuplify(obj):
    return tuple(_tuplify(v) for v in obj) if isinstance(obj, list) else obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _file_digests(root: Path) -> dict[str, dict]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_sha256, files))
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
