"""torch.distributed plumbing: DDP / FSDP2 under torchrun, and the collectives the loss needs.

Everything is read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), so
one config runs on 1 process or many. The two collectives that make a multi-rank update
equal the single-process one:

- ``gather_variable``: the candidates' entropies (a different count on each rank) are
  padded, all-gathered and concatenated in rank order before the S2T / 20-Entropy quantile;
- ``all_reduce_sum``: the loss denominator (tokens of the whole global mini-batch).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.strategy != "none"


LOCAL = DistContext()  # a single process, no process group


def init_distributed(strategy: str, device_type: str) -> DistContext:
    """Join the process group torchrun describes; a single process without torchrun stays local."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none":
        if world > 1:
            raise RuntimeError(
                f"launched with WORLD_SIZE={world} but parallel.strategy=none; set parallel.strategy=ddp or fsdp2"
            )
        return DistContext()
    if "RANK" not in os.environ:  # plain `python -m stapo train ... parallel.strategy=ddp`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), strategy)
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model, ctx: DistContext, device: torch.device):
    """DDP, or FSDP2 (``fully_shard`` on every decoder layer, then the root)."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if ctx.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        return model
    return model


def unwrap(model):
    """The module that owns ``generate`` / ``save_pretrained`` (DDP keeps it in ``.module``)."""
    return getattr(model, "module", model)


def gather_variable(values: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of per-rank length over all ranks of ``group`` (default: the world), in
    rank order (identical everywhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return values
    device = _collective_device()
    local = values.detach().to(device=device, dtype=torch.float64).reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.long, device=device), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.float64, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(values.device)


def all_reduce_sum(value: float, group=None) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, group=group)
    return float(t)


def reduce_metrics(metrics: dict[str, float], sum_keys=frozenset()) -> dict[str, float]:
    """Mean over ranks (sum for ``sum_keys``); keys missing on a rank count as absent there."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, metrics)
    out = {}
    for key in sorted({k for m in gathered for k in m}):
        vals = [float(m[key]) for m in gathered if key in m and m[key] is not None]
        if vals:
            out[key] = sum(vals) if key in sum_keys else sum(vals) / len(vals)
    return out


def broadcast_object(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
