"""torch.distributed set-up: the same ``longrange train`` runs alone or under ``torchrun``.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process joins the
group (NCCL on CUDA, gloo on CPU), trains on its own data shard, and rank 0 writes the run
folder. Models are wrapped in DDP, or FSDP when asked (large models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )
    if not dist.is_initialized():
        # The loop's scalars (loss, stop and skip flags) are CPU tensors: give CUDA runs gloo
        # for those beside NCCL for the gradients.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def pick_device(requested: str, info: DistInfo | None = None) -> torch.device:
    """ "auto": CUDA when available (one device per local rank), else CPU; otherwise cpu,
    cuda, cuda:N or mps, refused with a clear error when this machine lacks it."""
    if requested == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"--device {requested}: not a device longrange runs on; use auto, cpu, cuda, cuda:N or mps"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {requested}: MPS is not available on this machine")
    return device


def wrap_model(module: nn.Module, device: torch.device, info: DistInfo, *, fsdp: bool = False) -> nn.Module:
    if not info.enabled:
        return module
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module, device_id=device if device.type == "cuda" else None)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest ``value`` over the processes (every rank must call it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (small values: a run folder's path)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
