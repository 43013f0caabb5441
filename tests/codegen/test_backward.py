"""pbsa_backward: dQ, dK, dV of the generated kernels and of the torch backend against the
float64 oracle's gradients, with poisoned outputs and poisoned pages that are never listed."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.backward import pbsa_backward
from codegen.config import LaunchConfig
from codegen.launch import pbsa_triton
from codegen.launch_bwd import default_backward_configs, pbsa_backward_triton
from codegen.reference import pbsa_reference, pbsa_reference_backward
from codegen.samples import random_inputs, sample_problem, small_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error allowed relative to the gradient's largest magnitude: fp16/bf16 carry the rounding
# of out (delta = rowsum(dO·O)) and of P in the tensor-core products.
TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def unread(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """bool masks over k's elements ([..., D] of k's shape, without D) that the call must
    never read: pages no query head of the kv head lists, and paged slots past page_lens."""
    p = sample_problem(args)
    listed = torch.zeros(p.batch, p.kv_heads, p.num_pages + 1, dtype=torch.bool, device=DEVICE)
    slots = torch.arange(p.max_blocks, device=DEVICE) < p.kv_num_blocks.unsqueeze(-1)
    ids = torch.where(slots, p.kv_indices, p.num_pages).long()  # [B, H, Mq, Kmax]
    kv_of = (torch.arange(p.heads, device=DEVICE) // p.group).view(1, -1, 1, 1).expand_as(ids)
    b = torch.arange(p.batch, device=DEVICE).view(-1, 1, 1, 1).expand_as(ids)
    listed[b, kv_of, ids] = True
    listed = listed[..., : p.num_pages]
    tokens = torch.arange(p.page_size, device=DEVICE)
    if p.paged:
        lens = p.paged_kv()[2]
        return ~(listed.unsqueeze(-1) & (tokens < lens.unsqueeze(-1))), listed
    per_token = listed.repeat_interleave(p.page_size, dim=-1)[..., : p.kv_len]  # [B, Hkv, Lk]
    return (~per_token if p.layout == "BHLD" else ~per_token.transpose(1, 2)), listed


def poisoned(args: dict) -> dict:
    """args with NaN in every K/V element the call must never read."""
    mask, _ = unread(args)
    k, v = (t.masked_fill(mask.unsqueeze(-1), float("nan")) for t in (args["k"], args["v"]))
    return {**args, "k": k, "v": v}


def rounding_scale(args: dict, scale: float, out, grad_out, name: str) -> float:
    """Magnitude through which out's rounding to its dtype reaches dQ (·k) and dK (·q):
    delta = rowsum(dO·O) is computed from the rounded out, and dS = P·(dP - delta) is
    multiplied by k·scale (dQ) or q·scale (dK). dV does not see delta."""
    if name == "v":
        return 0.0
    delta = float((grad_out.double().abs() * out.double().abs()).sum(-1).max())
    other = args["k"] if name == "q" else args["q"]
    return float(other.double().abs().max()) * scale * delta


def check(args: dict, backend: str, dtype: torch.dtype, seed: int, configs=None) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    grad_out = torch.randn(args["q"].shape, generator=g, device=DEVICE).to(dtype)
    ref = pbsa_reference_backward(grad_out, **args)
    ref_out, ref_lse = pbsa_reference(**args)
    bad = poisoned(args)
    p = sample_problem(bad)
    out, lse = ref_out.to(dtype), ref_lse.float()
    if backend == "torch":
        got = pbsa_backward(p, out, lse, grad_out, backend="torch")
    else:  # results start as NaN: every element must be written
        nan = [torch.full_like(t, float("nan")) for t in (bad["q"], bad["k"], bad["v"])]
        got = pbsa_backward_triton(
            p,
            out,
            lse,
            grad_out,
            interpret=backend == "interpret",
            configs=configs,
            dq=nan[0],
            dk=nan[1],
            dv=nan[2],
        )
    mask, _ = unread(args)
    for name, x, r, like in zip("qkv", got, ref, (args["q"], args["k"], args["v"]), strict=True):
        assert x.shape == like.shape and x.dtype == like.dtype, name
        assert not x.isnan().any(), f"d{name}: NaN (an unwritten element or a poisoned read)"
        scale = max(float(r.abs().max()), rounding_scale(args, p.scale, out, grad_out, name), 1.0)
        torch.testing.assert_close(
            x.double(),
            r,
            atol=TOL[dtype] * scale,
            rtol=TOL[dtype],
            msg=lambda m, n=name: f"d{n}: {m}",
        )
    # Exact zeros where nothing flows: rows that see nothing, keys never read.
    empty = torch.isinf(ref_lse)  # [B, H, Lq]
    dq_rows = got[0] if p.layout == "BHLD" else got[0].transpose(1, 2)
    assert bool((dq_rows[empty] == 0).all())
    for x in got[1:]:
        assert bool((x[mask] == 0).all())


SHAPES = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 2),
        heads_kv=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),  # MHA, MQA, GQA
        q_len=st.integers(1, 40),
        head_dim=st.sampled_from([16, 32]),
        page_size=st.sampled_from([16, 32]),
        q_block=st.sampled_from([16, 32]),
        num_pages=st.integers(1, 3),
    )
)


def inputs(shape: dict, **kw) -> dict:
    heads, kv_heads = shape["heads_kv"]
    rest = {k: v for k, v in shape.items() if k != "heads_kv"}
    return random_inputs(heads=heads, kv_heads=kv_heads, device=DEVICE, **rest, **kw)


# The interpreter runs ~2 s per example on 2 cores: few, varied examples.
@pytest.mark.skipif(
    CUDA, reason="the interpreter needs a process without CUDA (its GPU twin is below)"
)
@settings(max_examples=20 if CUDA else 8)
@given(
    shape=SHAPES,
    paged=st.booleans(),
    layout=st.sampled_from(["BLHD", "BHLD"]),
    dtype=st.sampled_from(DTYPES),
    q_scale=st.sampled_from([1.0, 30.0]),  # 30: large logits, near one-hot rows
    seed=st.integers(0, 2**31 - 1),
    fused=st.booleans(),  # dQ from the dK/dV kernel (atomics) instead of its own kernel
)
def test_interpreted_kernels_match_the_oracle(shape, paged, layout, dtype, q_scale, seed, fused):
    args = inputs(shape, paged=paged, layout=layout, dtype=dtype, q_scale=q_scale, seed=seed)
    configs = None
    if fused:
        dq, dkdv = default_backward_configs(sample_problem(args), interpret=not CUDA)
        configs = (dq, dataclasses.replace(dkdv, fused_dq=True))
    check(args, "triton" if CUDA else "interpret", dtype, seed, configs=configs)


@settings(max_examples=40 if CUDA else 25)
@given(
    shape=SHAPES,
    paged=st.booleans(),
    layout=st.sampled_from(["BLHD", "BHLD"]),
    dtype=st.sampled_from(DTYPES),
    q_scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_backend_matches_the_oracle(shape, paged, layout, dtype, q_scale, seed):
    args = inputs(shape, paged=paged, layout=layout, dtype=dtype, q_scale=q_scale, seed=seed)
    check(args, "torch", dtype, seed)


@pytest.mark.parametrize(
    "paged, splits, fused", [(True, 1, False), (False, 1, False), (True, 2, False),
                             (False, 3, False), (True, 1, True), (False, 1, True)]
)  # fmt: skip
def test_tiles_smaller_than_pages_and_query_blocks(paged, splits, fused):
    """Several key tiles per page and query tiles per table row (SUB, Q_SUB > 1); dQ also in
    shares (float32 partials summed in a fixed order; rows with fewer steps than shares leave
    some empty), or added by the dK/dV programs (every key tile of a page adds to a row)."""
    tile = LaunchConfig(block_m=16, num_warps=4, num_stages=1, block_n=16)
    dq_tile = dataclasses.replace(tile, kv_splits=splits)
    if fused:
        tile = dataclasses.replace(tile, fused_dq=True)
    args = random_inputs(
        batch=2 if splits > 1 else 1,
        heads=2,
        kv_heads=1,
        q_len=45,
        head_dim=16,
        page_size=32,
        q_block=32,
        num_pages=3,
        paged=paged,
        dtype=torch.float16,
        q_scale=5.0,
        seed=7,
        device=DEVICE,
    )
    check(args, "triton" if CUDA else "interpret", torch.float16, 7, configs=(dq_tile, tile))


def test_dkdv_takes_no_shares():
    args = small_inputs(seed=1, device=DEVICE)
    p = sample_problem(args)
    out, lse = pbsa_reference(**args)
    dq = LaunchConfig(block_m=16, num_warps=4, num_stages=1, block_n=16)
    split = dataclasses.replace(dq, kv_splits=2)
    with pytest.raises(ValueError, match=r"configs\[1\].*kv_splits"):
        pbsa_backward_triton(
            p,
            out.to(args["q"].dtype),
            lse.float(),
            args["q"],
            interpret=not CUDA,
            configs=(dq, split),
        )


def test_fused_dq_is_a_backward_dkdv_choice_refused_under_deterministic_algorithms():
    args = small_inputs(seed=1, device=DEVICE)
    p = sample_problem(args)
    out, lse = pbsa_reference(**args)
    out, lse = out.to(args["q"].dtype), lse.float()
    tile = LaunchConfig(block_m=16, num_warps=4, num_stages=1, block_n=16)
    fused = dataclasses.replace(tile, fused_dq=True)
    run = dict(interpret=not CUDA)
    with pytest.raises(ValueError, match=r"configs\[0\]: fused_dq"):
        pbsa_backward_triton(p, out, lse, args["q"], configs=(fused, tile), **run)
    with pytest.raises(ValueError, match="fused_dq"):
        pbsa_triton(p, config=fused, **run)
    for bad in (dict(kv_splits=2), dict(tma=True)):
        with pytest.raises(ValueError, match="LaunchConfig.fused_dq"):
            dataclasses.replace(fused, **bad)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="not deterministic"):
            pbsa_backward_triton(p, out, lse, args["q"], configs=(tile, fused), **run)
    finally:
        torch.use_deterministic_algorithms(before)


def test_full_pages_without_page_lens():
    """The non-partial kernels (paged, page_lens None): no masking is generated."""
    args = small_inputs(seed=4, device=DEVICE)
    args["page_lens"] = None
    check(args, "triton" if CUDA else "interpret", torch.float32, 4)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(backend="cuda"), "backend"),
        (dict(out=lambda a: a["q"][:, :-1]), "out"),
        (dict(grad_out=lambda a: a["q"].double()), "grad_out"),
        (dict(lse=lambda a: torch.zeros(1, 2, 40, dtype=torch.float64)), "lse"),
        (dict(lse=lambda a: torch.zeros(1, 2, 39)), "lse"),
    ],
)
def test_rejects_bad_arguments(change, match):
    args = small_inputs(seed=0)
    p = sample_problem(args)
    call = dict(out=args["q"], lse=torch.zeros(1, 2, 40), grad_out=args["q"], backend="torch")
    call.update({k: (v(args) if callable(v) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        pbsa_backward(p, call.pop("out"), call.pop("lse"), call.pop("grad_out"), **call)


# --- GPU: real tl.dot in bf16/fp16, head_dim up to 256, larger shapes, every tuned tile ---

GPU_SHAPES = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 2),
        heads_kv=st.sampled_from([(2, 1), (4, 4), (6, 2)]),
        q_len=st.integers(1, 300),
        head_dim=st.sampled_from([64, 128, 256]),
        page_size=st.sampled_from([64, 128]),
        q_block=st.sampled_from([64, 128]),
        num_pages=st.integers(1, 6),
    )
)


# Most examples compile a new spec (three kernels): a few minutes in all on an H200.
@pytest.mark.gpu
@settings(max_examples=25)
@given(
    shape=GPU_SHAPES,
    paged=st.booleans(),
    layout=st.sampled_from(["BLHD", "BHLD"]),
    dtype=st.sampled_from(DTYPES),
    q_scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
    fused=st.booleans(),
)
def test_gpu_kernels_match_the_oracle(shape, paged, layout, dtype, q_scale, seed, fused):
    args = inputs(shape, paged=paged, layout=layout, dtype=dtype, q_scale=q_scale, seed=seed)
    configs = default_backward_configs(sample_problem(args), False, deterministic=not fused)
    check(args, "triton", dtype, seed, configs=configs)


@pytest.mark.gpu
@settings(max_examples=15)
@given(data=st.data(), paged=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gpu_every_tuning_candidate_is_correct(data, paged, seed):
    from codegen.tuning import backward_candidates

    args = random_inputs(
        batch=1,
        heads=4,
        kv_heads=2,
        q_len=200,
        head_dim=128,
        page_size=128,
        q_block=128,
        num_pages=4,
        dtype=torch.bfloat16,
        paged=paged,
        q_scale=10.0,
        seed=seed,
        device=DEVICE,
    )
    p = sample_problem(args)
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    dq = data.draw(st.sampled_from(backward_candidates(p, "bwd_dq", limit)))
    # the tuner also tries the dQ winner in shares
    dq = dataclasses.replace(dq, kv_splits=data.draw(st.sampled_from([1, 2, 3])))
    dkdv = data.draw(st.sampled_from(backward_candidates(p, "bwd_dkdv", limit)))
    if data.draw(st.booleans()):  # the same tile adding dQ too (bench.bwd_kernel --fused-dq)
        dkdv = dataclasses.replace(dkdv, fused_dq=True)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    grad_out = torch.randn(args["q"].shape, generator=g, device=DEVICE).to(torch.bfloat16)
    ref = pbsa_reference_backward(grad_out, **args)
    out, lse = pbsa_reference(**args)
    got = pbsa_backward_triton(p, out.bfloat16(), lse.float(), grad_out, configs=(dq, dkdv))
    for x, r in zip(got, ref, strict=True):
        scale = max(float(r.abs().max()), 1.0)
        torch.testing.assert_close(x.double(), r, atol=TOL[torch.bfloat16] * scale, rtol=4e-2)


def gpu_forward(heads: int, q_len: int, num_pages: int, seed: int):
    """A bf16 GQA problem on the GPU with its forward: (problem, out, lse, grad_out)."""
    from codegen.launch import pbsa_triton

    args = random_inputs(
        batch=1,
        heads=heads,
        kv_heads=2,
        q_len=q_len,
        head_dim=128,
        page_size=128,
        q_block=128,
        num_pages=num_pages,
        dtype=torch.bfloat16,
        seed=seed,
        device=DEVICE,
    )
    p = sample_problem(args)
    out, lse = pbsa_triton(p)
    return p, out, lse, torch.randn_like(out)


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_deterministic():
    p, out, lse, grad_out = gpu_forward(heads=8, q_len=1000, num_pages=12, seed=3)
    first = pbsa_backward(p, out, lse, grad_out, backend="triton")
    for _ in range(3):
        again = pbsa_backward(p, out, lse, grad_out, backend="triton")
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m, block_n, warps", [(32, 128, 8), (64, 128, 8), (64, 64, 8)])
def test_gpu_fused_dq_keeps_dkdv_deterministic_and_dq_close(block_m, block_n, warps):
    """dQ added by the dK/dV programs (float atomics, many programs per row: 12 pages, 8
    heads): dK and dV bit for bit the same on every run, dQ within float32 rounding of the
    split kernels' (its summation order changes)."""
    p, out, lse, grad_out = gpu_forward(heads=8, q_len=1000, num_pages=12, seed=3)
    dq_config = default_backward_configs(p, interpret=False)[0]
    tile = LaunchConfig(block_m, warps, 2, block_n=block_n)
    split = pbsa_backward_triton(p, out, lse, grad_out, configs=(dq_config, tile))
    fused = dataclasses.replace(tile, fused_dq=True)
    first = pbsa_backward_triton(p, out, lse, grad_out, configs=(dq_config, fused))
    for _ in range(3):
        again = pbsa_backward_triton(p, out, lse, grad_out, configs=(dq_config, fused))
        assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
        torch.testing.assert_close(again[0], first[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(first[0], split[0], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_backward_on_a_side_stream_and_in_a_graph_equals_the_plain_call():
    """dQ runs on a side stream: a caller on its own stream, and a CUDA-graph capture (which
    must take in the side stream's work), get the same gradients as a plain call."""
    p, out, lse, grad_out = gpu_forward(heads=4, q_len=600, num_pages=8, seed=5)
    want = pbsa_backward_triton(p, out, lse, grad_out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = pbsa_backward_triton(p, out, lse, grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pbsa_backward_triton(p, out, lse, grad_out, dq=dq, dk=dk, dv=dv)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip((dq, dk, dv), want, strict=True):
        assert torch.equal(a, b)
