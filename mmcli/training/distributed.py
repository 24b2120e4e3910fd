"""Data-parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA).

Each process trains the same model on its own share of every step's batches; after each
backward the gradients are averaged over the processes with one all-reduce of a flat
buffer. (Gradients are reduced by hand rather than through ``DistributedDataParallel``
because the training step calls the model's stages - ``encode``, ``classify``,
``decode`` - directly, and DDP only tracks calls to ``forward``.) Rank 0 writes every file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "all_reduce_gradients", "any_rank", "barrier", "broadcast_parameters", "init_distributed",
           "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns:
        The process's place and its device (``cuda:LOCAL_RANK`` for a CUDA device).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    logger.info("process %d of %d on %s", rank, world, device)
    return DistInfo(rank, world, local_rank, owns), device


def broadcast_parameters(model: nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's parameters and buffers."""
    if info.world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_gradients(model: nn.Module, info: DistInfo) -> None:
    """Average the parameters' gradients over the processes (missing gradients count as 0)."""
    if info.world <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process (so that every process takes the same branch)."""
    if info.world <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group if this module created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
