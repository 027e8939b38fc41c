"""torchrun support: DistributedDataParallel with NCCL on GPUs and gloo on CPUs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def device_for_rank(requested: str, local_rank: int) -> torch.device:
    """`--device cuda` means this process's own GPU, cuda:LOCAL_RANK; an explicit index or
    another device type is taken as given."""
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def init(requested_device: str) -> tuple[int, int, torch.device]:
    """Joins the process group when launched by torchrun; returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_for_rank(requested_device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
