"""Seeded random inputs and block tables for `pbsa_attention` (tests and examples)."""

from __future__ import annotations

import torch
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
