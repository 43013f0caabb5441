"""Block scoring: pooled block representatives and the learned per-head projections.

A block (a query block of ``q_block`` rows, or a KV page) is summarised by the mean of its
tokens. ``BlockScorer`` scores query blocks against key blocks with a learned linear map per
head on top of that mean::

    logit[b, h, m, n] = (q̄[b,h,m] @ Wq[h]) · (k̄[b,h//G,n] @ Wk[h//G]) / sqrt(D),   G = H // Hkv

Why a full ``D×D`` matrix per head, applied after pooling:

* A linear map commutes with the mean, so ``mean(x) @ W == mean(x @ W)``: projecting the
  pooled representative is exactly the same as pooling projected tokens, and the runtime
  only has to store the raw mean key of each page (``PagePool.key_reps``), never re-pool.
* The score is the bilinear form ``q̄ᵀ Wq Wkᵀ k̄``; a full matrix can rotate, re-weight or
  cancel any direction of the head space (e.g. a block-constant nuisance shared by keys that
  dominates the mean but not the attention), which a diagonal map can only do axis-aligned.
* It only ever touches block representatives (``M·N`` pairs per head, not ``Lq·Lk``), so
  its cost is negligible next to attention: ``(H + Hkv)·D²`` parameters per layer
  (≈ 0.4 M for Wan's 12×128 heads).

Both matrices start at the identity, so an untrained scorer is plain mean pooling.

Vocabulary: the module is the ``BlockScorer``; its parameters ``wq``/``wk`` are its
*projections*; a file holding every scorer's projections is a *scorer weights* file
(``patterns.scorer_weights``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from patterns.checks import check_int

__all__ = [
    "BlockScorer",
    "pool_query_blocks",
    "pool_pages",
    "pool_key_blocks",
    "query_block_rows",
    "block_attention_mass",
    "iter_scorers",
]

# Bounded working set of block_attention_mass: at most this many score elements at once.
DEFAULT_MASS_CHUNK_ELEMS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 stays float64: scores never run in bf16/fp16."""
    return torch.promote_types(dtype, torch.float32)


def _check_tensor(x: Tensor, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def query_block_rows(
    num_rows: int, q_block: int, device: torch.device | str | None = None
) -> Tensor:
    """Valid rows per query block: int64 ``[ceil(num_rows / q_block)]`` (last block partial)."""
    check_int(q_block, "q_block")
    num_blocks = -(-num_rows // q_block)
    starts = torch.arange(num_blocks, device=device) * q_block
    return (num_rows - starts).clamp(max=q_block)


@functools.lru_cache(maxsize=64)
def _block_rows(num_rows: int, q_block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``query_block_rows`` in ``dtype``, memoised (read-only): pooling runs on every pass of
    every layer, and rebuilding this constant costs four kernel launches each time."""
    return query_block_rows(num_rows, q_block, device=device).to(dtype)


def _block_sum(x: Tensor, block: int, dim: int) -> Tensor:
    """Sum ``x`` over consecutive groups of ``block`` entries along ``dim`` (zero-padded)."""
    length = x.shape[dim]
    num_blocks = -(-length // block)
    pad = num_blocks * block - length
    x = x.movedim(dim, -1)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], num_blocks, block).sum(-1)
    return x.movedim(-1, dim)


def pool_query_blocks(q: Tensor, q_block: int) -> Tensor:
    """Mean-pool query rows into blocks.

    q: ``[B, Lq, H, D]`` (BLHD). Returns ``[B, H, ceil(Lq / q_block), D]``, each entry the mean
    over the block's valid rows (the last block may be partial), in float32 (float64 stays).
    """
    _check_tensor(q, "q", 4, "[B, Lq, H, D]")
    check_int(q_block, "q_block")
    if q.shape[1] == 0:
        raise ValueError("q must have at least one query row (Lq > 0)")
    x = q.to(_compute_dtype(q.dtype))
    sums = _block_sum(x, q_block, dim=1)  # [B, M, H, D]
    rows = _block_rows(q.shape[1], q_block, q.device, x.dtype)
    return (sums / rows[:, None, None]).permute(0, 2, 1, 3)


def pool_pages(pages: Tensor, page_lens: Tensor) -> Tensor:
    """Mean-pool KV pages over their valid tokens.

    pages: ``[B, Hkv, N, page, D]``; page_lens: int ``[B, Hkv, N]`` in ``0..page``.
    Returns ``[B, Hkv, N, D]`` (float32, float64 stays); empty pages give 0.
    """
    _check_tensor(pages, "pages", 5, "[B, Hkv, N, page, D]")
    if (
        not isinstance(page_lens, Tensor)
        or page_lens.dtype.is_floating_point
        or page_lens.dtype == torch.bool
    ):
        raise TypeError("page_lens must be an integer tensor [B, Hkv, N]")
    if tuple(page_lens.shape) != tuple(pages.shape[:3]):
        raise ValueError(
            f"page_lens must have shape {tuple(pages.shape[:3])} (pages' [B, Hkv, N]), "
            f"got {tuple(page_lens.shape)}"
        )
    page = pages.shape[3]
    if page_lens.numel() and (int(page_lens.min()) < 0 or int(page_lens.max()) > page):
        raise ValueError(f"page_lens must lie in [0, {page}] (the page size)")
    x = pages.to(_compute_dtype(pages.dtype))
    lens = page_lens.to(pages.device)
    valid = torch.arange(page, device=pages.device) < lens[..., None]  # [B, Hkv, N, page]
    sums = torch.where(valid[..., None], x, x.new_zeros(())).sum(3)
    return sums / lens.clamp(min=1).to(x.dtype)[..., None]


def pool_key_blocks(k: Tensor, kv_block: int) -> Tensor:
    """Mean-pool contiguous keys into blocks of ``kv_block`` tokens (last block partial).

    k: ``[B, Lk, Hkv, D]`` (BLHD). Returns ``[B, Hkv, ceil(Lk / kv_block), D]``; equal to
    ``pool_pages`` of the same keys laid out as pages.
    """
    _check_tensor(k, "k", 4, "[B, Lk, Hkv, D]")
    return pool_query_blocks(k, kv_block)


def block_attention_mass(
    q: Tensor,
    k: Tensor,
    q_block: int,
    kv_block: int,
    *,
    scale: float | None = None,
    max_chunk_elems: int = DEFAULT_MASS_CHUNK_ELEMS,
) -> Tensor:
    """Dense block attention mass, the ground truth that scorers are measured against.

    q: ``[B, Lq, H, D]``, k: ``[B, Lk, Hkv, D]`` (BLHD, contiguous keys; key block n is tokens
    ``[n·kv_block, (n+1)·kv_block) ∩ [0, Lk)``). Query head h reads kv head ``h // (H // Hkv)``.
    Returns float32 (float64 stays) ``[B, H, Mq, N]``: the softmax attention weight
    (``scale`` defaults to ``1/sqrt(D)``, no mask) of each query row that falls in key block
    n, averaged over the rows of query block m. Every row sums to 1.

    Query rows are processed in chunks so at most ``max_chunk_elems`` scores exist at once.
    """
    _check_tensor(q, "q", 4, "[B, Lq, H, D]")
    _check_tensor(k, "k", 4, "[B, Lk, Hkv, D]")
    check_int(q_block, "q_block")
    check_int(kv_block, "kv_block")
    check_int(max_chunk_elems, "max_chunk_elems")
    batch, lq, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k must be [B={batch}, Lk, Hkv, D={dim}] to match q, got {tuple(k.shape)}"
        )
    lk, kv_heads = k.shape[1], k.shape[2]
    if lq == 0 or lk == 0:
        raise ValueError(f"q and k need at least one token, got Lq={lq}, Lk={lk}")
    if heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's heads ({kv_heads})")
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    dtype = _compute_dtype(torch.promote_types(q.dtype, k.dtype))
    # [B, Hkv, G, Lq, D] so each GQA group reads its kv head without copying k per query head
    qg = q.to(dtype).reshape(batch, lq, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    kh = k.to(dtype).permute(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    num_q_blocks = -(-lq // q_block)
    num_k_blocks = -(-lk // kv_block)
    out = torch.zeros(
        batch, kv_heads, group, num_q_blocks, num_k_blocks, dtype=dtype, device=q.device
    )
    rows_per_chunk = max(1, max_chunk_elems // (batch * heads * lk))
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        probs = (
            torch.einsum("bkgid,bkjd->bkgij", qg[:, :, :, start:stop], kh).mul_(scale).softmax(-1)
        )
        per_block = _block_sum(probs, kv_block, dim=-1)  # [B, Hkv, G, rows, N]
        block_ids = torch.arange(start, stop, device=q.device) // q_block
        out.index_add_(3, block_ids, per_block)
    rows = query_block_rows(lq, q_block, device=q.device).to(dtype)
    return (out / rows[:, None]).reshape(batch, heads, num_q_blocks, num_k_blocks)


class BlockScorer(nn.Module):
    """Learned block scores for one self-attention layer.

    Projections ``wq`` ``[H, D, D]`` and ``wk`` ``[Hkv, D, D]``, identity-initialised (an
    untrained scorer is mean pooling). Inputs are raw mean-pooled representatives
    (``pool_query_blocks`` / ``pool_pages``); scores are computed in float32 whatever the
    dtype of the inputs or of the parameters.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        check_int(num_heads, "num_heads")
        check_int(num_kv_heads, "num_kv_heads")
        check_int(head_dim, "head_dim")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        eye = torch.eye(head_dim)
        self.wq = nn.Parameter(eye.expand(num_heads, head_dim, head_dim).clone())
        self.wk = nn.Parameter(eye.expand(num_kv_heads, head_dim, head_dim).clone())

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}"
        )

    def _check_reps(self, q_reps: Tensor, k_reps: Tensor) -> None:
        _check_tensor(q_reps, "q_reps", 4, "[B, H, M, D]")
        _check_tensor(k_reps, "k_reps", 4, "[B, Hkv, N, D]")
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if q_reps.shape[1] != h or q_reps.shape[3] != d:
            raise ValueError(f"q_reps must be [B, H={h}, M, D={d}], got {tuple(q_reps.shape)}")
        if k_reps.shape[1] != hkv or k_reps.shape[3] != d:
            raise ValueError(f"k_reps must be [B, Hkv={hkv}, N, D={d}], got {tuple(k_reps.shape)}")
        if q_reps.shape[0] != k_reps.shape[0]:
            raise ValueError(
                "q_reps and k_reps must share the batch size, "
                f"got {q_reps.shape[0]} and {k_reps.shape[0]}"
            )

    def block_logits(self, q_reps: Tensor, k_reps: Tensor) -> Tensor:
        """Projected block scores.

        q_reps ``[B, H, M, D]``, k_reps ``[B, Hkv, N, D]`` (raw means) → float32 (float64
        stays) ``[B, H, M, N]`` = ``φ_Q(q̄)·φ_K(k̄)/sqrt(D)``; query head h uses kv head
        ``h // (H // Hkv)``.
        """
        self._check_reps(q_reps, k_reps)
        dtype = _compute_dtype(torch.promote_types(q_reps.dtype, k_reps.dtype))
        batch, heads, m, d = q_reps.shape
        hkv = self.num_kv_heads
        # broadcast matmuls, not einsums: the same batched GEMMs with a fraction of the
        # host-side view ops (this runs on every pass of every layer)
        phi_q = torch.matmul(q_reps.to(dtype), self.wq.to(dtype))
        phi_k = torch.matmul(k_reps.to(dtype), self.wk.to(dtype))
        phi_q = phi_q.reshape(batch, hkv, heads // hkv, m, d)
        logits = torch.matmul(phi_q, phi_k.transpose(-1, -2)[:, :, None]) / math.sqrt(d)
        return logits.reshape(batch, heads, m, k_reps.shape[2])

    def importance(self, q_reps: Tensor, k_reps: Tensor, candidate_mask: Tensor) -> Tensor:
        """Importance of each candidate key block for the queries of this chunk.

        candidate_mask: bool ``[B, Hkv, N]``. Returns float32 ``[B, Hkv, N]``: for every query
        block and query head, the softmax of ``block_logits`` over that kv head's candidate
        blocks, summed over query blocks and over the query heads of the GQA group (so each
        kv head's candidates sum to ``M · H/Hkv``). Non-candidates are ``-inf``; a kv head
        without candidates is all ``-inf``.
        """
        self._check_reps(q_reps, k_reps)
        expected = (k_reps.shape[0], self.num_kv_heads, k_reps.shape[2])
        if not isinstance(candidate_mask, Tensor) or candidate_mask.dtype != torch.bool:
            raise TypeError(f"candidate_mask must be a bool tensor {list(expected)}")
        if tuple(candidate_mask.shape) != expected:
            raise ValueError(
                f"candidate_mask must have shape [B, Hkv, N] = {list(expected)}, "
                f"got {list(candidate_mask.shape)}"
            )
        logits = self.block_logits(q_reps, k_reps)
        batch, heads, m, n = logits.shape
        hkv = self.num_kv_heads
        logits = logits.reshape(batch, hkv, heads // hkv, m, n)
        mask = candidate_mask.to(logits.device)[:, :, None, None, :]
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        # a kv head with no candidate gives NaN rows above; they contribute nothing
        probs = torch.where(mask, probs, probs.new_zeros(()))
        scores = probs.sum(dim=(2, 3))
        return scores.masked_fill(~candidate_mask.to(scores.device), float("-inf"))


def iter_scorers(module: nn.Module) -> Iterator[tuple[str, BlockScorer]]:
    """Every ``BlockScorer`` inside ``module`` (itself included), with its module path."""
    for name, sub in module.named_modules():
        if isinstance(sub, BlockScorer):
            yield name, sub
