"""The torch.distributed plumbing of head-parallel rollouts: which heads a rank owns, the
all-gather that reassembles them, and the host-side agreement that makes a rejected call
rejected on every rank.

A `HeadGroup` is a process group seen as a partition of the attention heads: rank r of N
owns query heads ``[r·H/N, (r+1)·H/N)`` and kv heads ``[r·Hkv/N, (r+1)·Hkv/N)`` (whole GQA
groups, so no kv head is split). ``agree`` runs over a gloo group on the host (the process
group itself when it is gloo, a gloo twin of an NCCL group otherwise), so it never syncs
with a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from patterns.checks import check_int

__all__ = ["REJECTIONS", "HeadGroup", "RankDisagreement", "check_head_split", "describe_inputs"]

# What a runner's checks raise for a call they reject (anything else is a bug, not agreed on).
REJECTIONS = (TypeError, ValueError, RuntimeError)


class RankDisagreement(RuntimeError):
    """Another rank rejected a call, or the ranks were given different calls: every rank
    rejects it before changing anything."""


def check_head_split(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """ValueError naming ``world_size`` (torchrun's ``--nproc-per-node``) unless it divides
    the kv heads (hence the query heads): every rank owns whole heads and GQA groups."""
    check_int(num_heads, "num_heads")
    check_int(num_kv_heads, "num_kv_heads")
    check_int(world_size, "world_size")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if num_kv_heads % world_size:
        divisors = [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]
        raise ValueError(
            f"world_size={world_size} (torchrun --nproc-per-node) must divide the model's "
            f"{num_kv_heads} kv heads ({num_heads} query heads), so that every rank owns whole "
            f"heads; use one of {divisors}"
        )


def _fact(x: object) -> object:
    """What must be equal on every rank about one argument (never tensor values: comparing
    them would cost a collective as large as the tensor)."""
    if isinstance(x, Tensor):
        return ("Tensor", tuple(x.shape), str(x.dtype), x.device.type)
    if isinstance(x, torch.device):
        return ("device", x.type)
    if isinstance(x, (bool, int, float, str, type(None), torch.dtype)):
        return x if not isinstance(x, torch.dtype) else str(x)
    return type(x).__name__


def describe_inputs(*args: object) -> tuple:
    """The facts of a call that every rank must share (shapes, dtypes, device types, ints)."""
    return tuple(_fact(a) for a in args)


class HeadGroup:
    """A process group partitioning ``num_heads`` query and ``num_kv_heads`` kv heads.

    group: a torch.distributed process group (None: the default group, e.g. torchrun's).
    Constructing one is collective when the group is not gloo (it makes the gloo twin used
    by ``agree``): every rank of the group must construct its HeadGroups in the same order.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "parallel: head-parallel execution needs torch.distributed initialised "
                "(start with torchrun --nproc-per-node N, or call "
                "torch.distributed.init_process_group first)"
            )
        self.group = group if group is not None else dist.group.WORLD
        world_size = dist.get_world_size(self.group)
        check_head_split(num_heads, num_kv_heads, world_size)
        self.rank, self.world_size = dist.get_rank(self.group), world_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        if dist.get_backend(self.group) == "gloo":
            self._host_group = self.group
        else:
            ranks = dist.get_process_group_ranks(self.group)
            self._host_group = dist.new_group(ranks=ranks, backend="gloo")

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def head_range(self) -> range:
        """This rank's query heads."""
        n = self.local_heads
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_head_range(self) -> range:
        """This rank's kv heads."""
        n = self.local_kv_heads
        return range(self.rank * n, (self.rank + 1) * n)

    def local_q(self, x: Tensor) -> Tensor:
        """This rank's query heads of a BLHD tensor ``[B, L, H, D]``, contiguous (the kernels
        and the scratch writes then see the layout they see in one process)."""
        r = self.head_range
        return x[:, :, r.start : r.stop].contiguous()

    def local_kv(self, x: Tensor) -> Tensor:
        """This rank's kv heads of a BLHD tensor ``[B, L, Hkv, D]``, contiguous."""
        r = self.kv_head_range
        return x[:, :, r.start : r.stop].contiguous()

    def gather_heads(self, local: Tensor) -> Tensor:
        """Every rank's ``[B, L, H/N, D]`` → ``[B, L, H, D]`` (rank r's heads at
        ``head_range``), the same tensor on every rank."""
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=2)

    def agree(self, error: BaseException | None, facts: tuple) -> None:
        """Collective over the host: every rank says whether it rejected the call (``error``)
        and what the call was (``facts``, see ``describe_inputs``). Raises ``error`` on the
        rank that rejected, `RankDisagreement` on the others, and `RankDisagreement` on all
        ranks when their facts differ; returns only when every rank accepts the same call."""
        verdicts: list = [None] * self.world_size
        message = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(verdicts, (message, facts), group=self._host_group)
        if error is not None:
            raise error
        rejected = [(rank, msg) for rank, (msg, _) in enumerate(verdicts) if msg is not None]
        if rejected:
            listing = "; ".join(f"rank {rank}: {msg}" for rank, msg in rejected)
            raise RankDisagreement(f"rejected on every rank because {listing}")
        if any(f != facts for _, f in verdicts):
            listing = "; ".join(f"rank {rank}: {f}" for rank, (_, f) in enumerate(verdicts))
            raise RankDisagreement(
                "the ranks were given different calls (every rank must run the same rollout "
                f"with the same shapes); rejected on every rank: {listing}"
            )

    def __deepcopy__(self, memo: dict) -> HeadGroup:
        # a copied module still runs on the same ranks: the process groups are shared
        return self

    def __repr__(self) -> str:
        return (
            f"HeadGroup(rank {self.rank} of {self.world_size}: heads {self.head_range.start}.."
            f"{self.head_range.stop - 1} of {self.num_heads})"
        )
