"""Distributed training (nanoGPT-sized). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the
environment) the model is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU), each
rank trains on a disjoint slice of every epoch, validation cases are split between ranks and
the Dice sums all-reduced, and only rank 0 writes files and logs. Before validation every rank
takes rank 0's buffers (BatchNorm running statistics, which each rank otherwise updates from
its own batches), so every rank validates the model rank 0 saves. At the end the ranks compare
a hash of their parameters and buffers. On one process every helper here is the identity.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

import models

from ..core.runner import get_logger

__all__ = [
    "DistContext",
    "setup_distributed",
    "teardown_distributed",
    "all_sum",
    "weights_digest",
    "broadcast_buffers",
    "check_replicas_agree",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` and ``world_size`` (1: not distributed), the
    rank on its node (``local_rank``: its CUDA device index) and the torch ``device`` it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> DistContext:
    """Rank, world size and device from torchrun's environment; joins the process group when
    WORLD_SIZE > 1 (NCCL for CUDA, gloo for CPU). Selects cuda:LOCAL_RANK with
    ``torch.cuda.set_device``; CUDA_VISIBLE_DEVICES is never touched. Ranks other than 0 log
    warnings and errors only."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if rank != 0:
        get_logger().setLevel("WARNING")
    return DistContext(rank, world_size, local_rank, target)


def teardown_distributed() -> None:
    """Leave the process group, if one was joined (any number of calls)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; identity on one process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the bytes of all parameters and buffers (BatchNorm running
    statistics included: :func:`broadcast_buffers` makes them equal before validation)."""
    h = hashlib.sha256()
    net = models.unwrap_model(model)
    for tensor in [*net.parameters(), *net.buffers()]:
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, in place."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_replicas_agree(model: nn.Module, ctx: DistContext) -> str:
    """Gather every rank's parameter digest; raise RuntimeError when they differ."""
    digest = weights_digest(model)
    if not ctx.distributed:
        return digest
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=ctx.device)
    gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"ranks ended with different weights: digests {[f'{v:015x}' for v in values]}")
    return digest
