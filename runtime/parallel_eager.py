"""The dense baseline made head-parallel the same way as the sparse runtime
(`runtime.parallel`): Self-Forcing's eager KV cache holding this rank's kv heads only.

Each rank runs the whole reference model; in every self-attention layer the cache slot keeps
this rank's kv heads of the chunk (``HeadShardedCache``), the attention spelling computes
this rank's query heads over them and all-gathers the outputs (``HeadParallelAttention``).
So the dense and the sparse rollout compare at the same N with the same communication.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from patterns import CachePolicy
from runtime.checks import check_reset_args
from runtime.distributed import REJECTIONS, HeadGroup, describe_inputs
from runtime.eager import EagerRunner, FrameCache
from runtime.model import CausalWanModel

__all__ = ["HeadParallelAttention", "HeadParallelEagerRunner", "HeadShardedCache"]


class HeadParallelAttention(nn.Module):
    """An attention spelling of the reference model over this rank's heads: q
    ``[B, L, H, D]`` (every head), k, v ``[B, Lk, Hkv/N, D]`` (this rank's, from a
    ``HeadShardedCache`` slot) → ``[B, L, H, D]``, gathered over the ranks."""

    def __init__(self, inner: nn.Module, heads: HeadGroup):
        super().__init__()
        self.inner, self.heads = inner, heads

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        h, hkv = self.heads.num_heads, self.heads.local_kv_heads
        if q.ndim != 4 or q.shape[2] != h or k.ndim != 4 or k.shape[2] != hkv:
            raise ValueError(
                f"q must have {h} heads and k, v this rank's {hkv} (BLHD), got "
                f"{list(q.shape)} and {list(k.shape)}"
            )
        return self.heads.gather_heads(self.inner(self.heads.local_q(q), k, v))


class _ShardSlot:
    """A layer's cache slot (``runtime.model.KVCacheSlot``) that keeps this rank's kv heads."""

    def __init__(self, slot, heads: HeadGroup):
        self._slot, self._heads = slot, heads

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self._slot.keys_values(self._heads.local_kv(k), self._heads.local_kv(v))


class HeadShardedCache(FrameCache):
    """A `runtime.eager.FrameCache` of ``policy`` whose slots hold this rank's kv heads
    (``kv_bytes`` and ``peak_kv_bytes`` are this rank's)."""

    def __init__(self, policy: CachePolicy, heads: HeadGroup):
        super().__init__(policy)
        self.heads = heads

    def begin_chunk(self, start_frame: int, commit: bool) -> list[_ShardSlot]:
        return [_ShardSlot(slot, self.heads) for slot in super().begin_chunk(start_frame, commit)]

    def __repr__(self) -> str:
        return f"HeadShardedCache({self.policy!r}, {self.heads!r})"


class HeadParallelEagerRunner(EagerRunner):
    """`EagerRunner` of a copy of ``model`` whose self-attention computes this rank's heads
    over a `HeadShardedCache` of ``cache``'s policy (default: the global cache). Every rank
    calls it with the same arguments; ``reset`` and each call are checked and agreed by all
    ranks before any rank touches its cache (see `runtime.parallel`).

    group: the process group (None: the default one); N must divide the kv heads.
    """

    def __init__(
        self,
        model: CausalWanModel,
        cache: FrameCache | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(model, CausalWanModel):
            raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
        if cache is not None and not isinstance(cache, FrameCache):
            raise TypeError(f"cache must be a FrameCache, got {type(cache).__name__}")
        cfg = model.config
        heads = HeadGroup(cfg.num_heads, cfg.num_kv_heads, group)
        bound = copy.deepcopy(model)
        for block in bound.blocks:
            block.self_attn.attn = HeadParallelAttention(block.self_attn.attn, heads)
        policy = CachePolicy() if cache is None else cache.policy
        super().__init__(bound, HeadShardedCache(policy, heads))
        self.heads = heads

    def reset(self, batch_size: int, device, dtype: torch.dtype, num_frames: int) -> None:
        cfg, error, facts = self.model.config, None, ()
        try:
            check_reset_args(batch_size, dtype, num_frames, cfg.frames_per_chunk, self.max_frames)
            facts = ("reset", *describe_inputs(batch_size, torch.device(device), dtype, num_frames))
        except REJECTIONS as exc:
            error = exc
        self.heads.agree(error, facts)
        super().reset(batch_size, device, dtype, num_frames)

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        error = None
        try:
            self._check_call(x, start_frame, commit)
        except REJECTIONS as exc:
            error = exc
        facts = ("pass", *describe_inputs(commit, start_frame, x, timestep, context))
        self.heads.agree(error, facts)
        return super().__call__(x, timestep, context, start_frame, commit)
