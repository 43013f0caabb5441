"""Seeded random inputs and block tables for `pbsa_attention` (tests and examples), and the
kernel benchmark's cases (`KernelCase`, `CASES`) with their inputs and tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from codegen.problem import Problem, validate


def random_table(
    counts: Tensor,
    num_pages: int,
    *,
    generator: torch.Generator | None = None,
    kmax: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A random duplicate-free, ascending table with the given per-row page counts.

    counts: int [B, H, Mq] with values in [0, num_pages]. Returns (kv_num_blocks int32
    [B, H, Mq], kv_indices int32 [B, H, Mq, Kmax]) on counts' device; padding slots hold 0.
    Kmax defaults to the largest count (at least 1).
    """
    if counts.numel() and (counts.min() < 0 or counts.max() > num_pages):
        raise ValueError(f"counts: values must lie in [0, num_pages={num_pages}]")
    if kmax is None:
        kmax = max(1, int(counts.max().item()) if counts.numel() else 1)
    dev = counts.device
    keys = torch.rand(*counts.shape, num_pages, generator=generator, device=dev)
    rank = keys.argsort(dim=-1).argsort(dim=-1)  # a random permutation rank per row
    chosen = rank < counts.unsqueeze(-1)
    ids = torch.arange(num_pages, device=dev)
    # Chosen ids sort first, in ascending order; the rest are pushed past num_pages.
    order = torch.where(chosen, ids, ids + num_pages).sort(dim=-1).values
    if kmax > num_pages:  # more slots than pages: the extra slots are padding
        order = torch.nn.functional.pad(order, (0, kmax - num_pages))
    listed = torch.arange(kmax, device=dev) < counts.unsqueeze(-1)
    indices = torch.where(listed, order[..., :kmax], 0)
    return counts.to(torch.int32), indices.to(torch.int32)


def random_inputs(
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    head_dim: int,
    page_size: int,
    q_block: int,
    num_pages: int,
    dtype: torch.dtype = torch.float32,
    layout: str = "BLHD",
    paged: bool = True,
    q_scale: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Keyword arguments for `pbsa_attention`: random normal q/k/v and a random table.

    Paged: pools [B, Hkv, NP, page, D] with page lengths drawn from {0, page, uniform} (so
    empty and partial pages occur). Contiguous: Lk = NP·page minus a random tail, so the last
    page is partial. Row counts are uniform in [0, NP] (some rows list nothing). q is scaled
    by q_scale to reach large-magnitude logits.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q_shape = (
        (batch, q_len, heads, head_dim) if layout == "BLHD" else (batch, heads, q_len, head_dim)
    )
    q = (torch.randn(*q_shape, generator=g, device=device) * q_scale).to(dtype)
    mq = -(-q_len // q_block)
    counts = torch.randint(0, num_pages + 1, (batch, heads, mq), generator=g, device=device)
    kv_num_blocks, kv_indices = random_table(counts, num_pages, generator=g)
    args = dict(
        q=q,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        layout=layout,
        q_block=q_block,
        page_size=page_size,
    )
    if paged:
        kind = torch.randint(0, 3, (batch, kv_heads, num_pages), generator=g, device=device)
        part = torch.randint(1, page_size + 1, kind.shape, generator=g, device=device)
        lens = torch.where(kind == 0, 0, torch.where(kind == 1, page_size, part))
        shape = (batch, kv_heads, num_pages, page_size, head_dim)
        args.update(k=normal(*shape), v=normal(*shape), page_lens=lens.to(torch.int32))
    else:
        tail = int(torch.randint(0, page_size, (1,), generator=g, device=device))
        kv_len = num_pages * page_size - tail
        kv_shape = (
            (batch, kv_len, kv_heads, head_dim)
            if layout == "BLHD"
            else (batch, kv_heads, kv_len, head_dim)
        )
        args.update(k=normal(*kv_shape), v=normal(*kv_shape))
    return args


SMALL = dict(
    batch=1, heads=2, kv_heads=1, q_len=40, head_dim=16, page_size=16, q_block=16, num_pages=3
)


def small_inputs(**overrides) -> dict:
    """`random_inputs` of a small GQA case (2 query heads on 1 kv head, 40 queries, 3 pages
    of 16), with any argument overridden."""
    return random_inputs(**{**SMALL, **overrides})


def sample_problem(args: dict) -> Problem:
    """The validated `Problem` of `random_inputs`' arguments (default scale)."""
    return validate(**{**args, "page_lens": args.get("page_lens")}, scale=None)


# The kernel benchmark's shapes (`bench.kernel`, `sparsify autotune`): B=1, H=12, D=128, bf16,
# BLHD, one chunk of 3 frames x 1560 queries against a contiguous KV of persistent tokens then
# the window.
PAGE = 128
Q_BLOCK = 128


@dataclass(frozen=True)
class KernelCase:
    name: str
    kv_tokens: int
    persistent_tokens: int
    densities: tuple[float, ...]
    q_len: int = 3 * 1560
    tokens_per_frame: int = 1560
    heads: int = 12
    head_dim: int = 128

    @property
    def num_pages(self) -> int:
        return math.ceil(self.kv_tokens / PAGE)

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / Q_BLOCK)


CASES = {
    "sf5s": KernelCase("sf5s", 21 * 1560, 4096, (1.0, 0.25, 0.125, 0.0625)),
    "paper65k": KernelCase("paper65k", 42 * 1560, 4096, (0.25, 0.125, 0.0625)),
}


def build_table(
    case: KernelCase, density: float, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(kv_num_blocks int32 [1, H, Mq], kv_indices int32 [1, H, Mq, Kmax]) of the case.

    Visible: persistent pages, the pages holding the query block's own frames, and
    round(density · other window pages) random others (seeded).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    h, mq, npg = case.heads, case.num_q_blocks, case.num_pages
    first_window = case.persistent_tokens // PAGE
    pages = torch.arange(npg, device=device)
    rows0 = torch.arange(mq, device=device) * Q_BLOCK
    rows1 = torch.clamp(rows0 + Q_BLOCK, max=case.q_len) - 1
    chunk0 = case.kv_tokens - case.q_len  # KV position of the first query token
    own_lo = (chunk0 + (rows0 // case.tokens_per_frame) * case.tokens_per_frame) // PAGE
    own_hi = -(-(chunk0 + (rows1 // case.tokens_per_frame + 1) * case.tokens_per_frame) // PAGE)
    own = (pages >= own_lo[:, None]) & (pages < own_hi[:, None])  # [Mq, NP]
    window = pages >= first_window
    others = window & ~own
    n_pick = torch.round(density * others.sum(-1).float()).long()  # [Mq]
    score = torch.rand(h, mq, npg, generator=g, device=device).masked_fill(~others, -1.0)
    rank = score.argsort(-1, descending=True).argsort(-1)
    visible = (rank < n_pick[:, None]) & others | own | ~window
    counts = visible.sum(-1).to(torch.int32)
    order = torch.where(visible, pages, pages + npg).sort(-1).values
    idx = torch.where(pages < counts[..., None], order, 0).to(torch.int32)
    kmax = int(counts.max())  # table width = the longest row, as a real selector emits
    return counts[None], idx[None, ..., :kmax].contiguous()


def case_tensors(case: KernelCase, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """Seeded bf16 inputs of a case: q [1, Lq, H, D] and k, v [1, Lk, H, D] (BLHD,
    contiguous), and the same K/V as a paged pool [1, H, NP, 128, D] (zero tail) with its
    page lengths int32 [1, H, NP]."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, d, lk = 1, case.heads, case.head_dim, case.kv_tokens
    q = torch.randn(b, case.q_len, h, d, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, lk, h, d, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, lk, h, d, device=device, dtype=torch.bfloat16, generator=g)
    pad = case.num_pages * PAGE - lk
    k_pool, v_pool = (
        F.pad(t.transpose(1, 2), (0, 0, 0, pad)).reshape(b, h, case.num_pages, PAGE, d).contiguous()
        for t in (k, v)
    )
    page_lens = torch.full((b, h, case.num_pages), PAGE, dtype=torch.int32, device=device)
    page_lens[..., -1] = lk - (case.num_pages - 1) * PAGE
    return q, k, v, k_pool, v_pool, page_lens
