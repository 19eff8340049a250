"""torchrun support: one process group for training jobs, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import os


def setup() -> tuple[int, int]:
    """Join the process group when run under torchrun (``WORLD_SIZE`` > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` outside torchrun)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
