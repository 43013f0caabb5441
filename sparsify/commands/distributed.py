"""Joining the process group that ``torchrun --nproc-per-node N`` set up, for the commands'
``--parallel heads`` (every rank runs the same command; rank 0 reports and writes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["join_torchrun", "is_main_rank"]


def join_torchrun(device: str | None = None) -> torch.device:
    """Initialise torch.distributed from torchrun's environment (NCCL on CUDA, gloo on the
    CPU) unless it is already; returns this rank's device (``cuda:LOCAL_RANK`` on CUDA,
    else ``device`` or the CPU). RuntimeError when not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "--parallel heads: start the command with torchrun --nproc-per-node N "
            "(N dividing the model's heads), e.g. torchrun --nproc-per-node 2 -m sparsify ..."
        )
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if local is not None:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=local)
    return local if local is not None else torch.device(device or "cpu")


def is_main_rank() -> bool:
    """Rank 0 of the default group, or a process without one."""
    return not dist.is_initialized() or dist.get_rank() == 0
