"""The generated kernel under each launch path, with poisoned outputs, and its compile reuse."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.config import LaunchConfig, supports_tma
from codegen.launch import pbsa_triton
from codegen.reference import pbsa_reference
from codegen.samples import random_inputs, sample_problem, small_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HOPPER = CUDA and supports_tma(torch.device("cuda"))
CONFIGS = [LaunchConfig(block_m=32, num_warps=4, num_stages=2)]
if not CUDA or HOPPER:
    # The interpreter runs the TMA path too (host tensor descriptors are emulated).
    CONFIGS += [
        LaunchConfig(block_m=32, num_warps=4, num_stages=2, tma=True, scheduled=True, block_n=16),
        LaunchConfig(block_m=32, num_warps=4, num_stages=2, tma=True, warp_specialize=True),
        # split walks: 2 shares with pointer loads, 3 in longest-first order (some shares of
        # short rows are empty)
        LaunchConfig(block_m=32, num_warps=4, num_stages=2, kv_splits=2),
        LaunchConfig(block_m=32, num_warps=4, num_stages=2, tma=True, scheduled=True, kv_splits=3),
    ]
if HOPPER:
    CONFIGS += [
        LaunchConfig(block_m=64, num_warps=4, num_stages=3, tma=True),
        LaunchConfig(block_m=64, num_warps=4, num_stages=3, tma=True, scheduled=True),
        LaunchConfig(block_m=64, num_warps=4, num_stages=3, tma=True, block_n=16),
        LaunchConfig(block_m=64, num_warps=4, num_stages=3, block_n=16),
        LaunchConfig(block_m=128, num_warps=8, num_stages=2, tma=True, warp_specialize=True),
        LaunchConfig(block_m=128, num_warps=8, num_stages=3, tma=True, kv_splits=2),
        LaunchConfig(block_m=64, num_warps=4, num_stages=3, tma=True, block_n=16, kv_splits=4),
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@settings(max_examples=30 if CUDA else 4)
@given(
    paged=st.booleans(),
    layout=st.sampled_from(["BLHD", "BHLD"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_element_written_and_correct(config, paged, layout, dtype, seed):
    q_len = 141 if CUDA else 70  # not a multiple of any block_m
    args = random_inputs(
        batch=2,
        heads=4,
        kv_heads=2,
        q_len=q_len,
        head_dim=64 if CUDA else 32,
        page_size=32,
        q_block=128 if CUDA else 64,
        num_pages=7 if CUDA else 4,
        dtype=dtype,
        layout=layout,
        paged=paged,
        q_scale=30.0,
        seed=seed,
        device=DEVICE,
    )
    p = sample_problem(args)
    out = torch.full_like(args["q"], float("nan"))
    lse = torch.full((2, 4, q_len), float("nan"), device=DEVICE)
    pbsa_triton(p, config=config, interpret=not CUDA, out=out, lse=lse)
    ref_out, ref_lse = pbsa_reference(**args)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=2e-2)
    live = ~torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), ~live)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=2e-2, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter compiles nothing)")
@pytest.mark.parametrize(
    "tma", [False, True] if CUDA and supports_tma(torch.device("cuda")) else [False]
)
def test_new_lengths_and_tables_reuse_the_compiled_kernel(tma):
    from codegen.cache import get_kernel
    from codegen.config import spec_for

    config = LaunchConfig(block_m=64, num_warps=4, num_stages=2, tma=tma)
    shapes = [(130, 5, 0), (4680, 9, 1), (77, 16, 2), (1, 3, 3)]  # (Lq, num_pages, seed)
    kernel, sizes = None, []
    for paged in (True, False):
        for q_len, pages, seed in shapes:
            args = random_inputs(
                batch=1,
                heads=2,
                kv_heads=1,
                q_len=q_len,
                head_dim=64,
                page_size=64,
                q_block=64,
                num_pages=pages,
                paged=paged,
                dtype=torch.bfloat16,
                seed=seed,
                device=DEVICE,
            )
            p = sample_problem(args)
            pbsa_triton(p, config=config)
            kernel = get_kernel(spec_for(p, config, True))
            sizes.append(sum(len(c[0]) for c in kernel.device_caches.values()))
        assert sizes[-1] == sizes[-len(shapes)], f"recompiled for new lengths: {sizes}"


def test_schedule_of_one_table_follows_the_query_length():
    """A table reused for a shorter chunk (same q blocks, fewer tiles) gets its own order."""
    from codegen.launch import _schedule

    args = small_inputs(q_len=100, q_block=128, seed=2, device=DEVICE)
    long = sample_problem(args)
    short = sample_problem({**args, "q": args["q"][:, :40]})
    assert short.kv_num_blocks is long.kv_num_blocks
    for p in (long, short, long):
        order = _schedule(p, 32)
        assert sorted(order.tolist()) == list(range(2 * -(-p.q_len // 32)))


@settings(max_examples=20 if CUDA else 3)
@given(
    splits=st.sampled_from([2, 3, 8]),
    tma=st.booleans() if (HOPPER or not CUDA) else st.just(False),
    paged=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_split_walk_equals_the_whole_walk(splits, tma, paged, seed):
    """fp32, where the two walks differ only by summation order: shares of rows with fewer
    steps than splits are empty, and a row no share sees stays out 0, LSE -inf; without the
    LSE the output is the same."""
    args = random_inputs(
        batch=1,
        heads=2,
        kv_heads=1,
        q_len=45,
        head_dim=16 if not CUDA else 64,
        page_size=16,
        q_block=32,
        num_pages=5,
        dtype=torch.float32,
        paged=paged,
        seed=seed,
        device=DEVICE,
    )
    p = sample_problem(args)
    whole = LaunchConfig(block_m=16, num_warps=4, num_stages=2, tma=tma)
    split = LaunchConfig(block_m=16, num_warps=4, num_stages=2, tma=tma, kv_splits=splits)
    out, lse = pbsa_triton(p, config=whole, interpret=not CUDA)
    poisoned = torch.full_like(args["q"], float("nan"))
    split_out, split_lse = pbsa_triton(p, config=split, interpret=not CUDA, out=poisoned)
    torch.testing.assert_close(split_out, out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(split_lse), torch.isinf(lse))
    live = ~torch.isinf(lse)
    torch.testing.assert_close(split_lse[live], lse[live], atol=1e-5, rtol=1e-6)
    no_lse_out, no_lse = pbsa_triton(p, config=split, interpret=not CUDA, return_lse=False)
    assert no_lse is None
    torch.testing.assert_close(no_lse_out, out, atol=1e-5, rtol=1e-5)
