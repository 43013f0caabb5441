"""Backward kernels alone (GPU): PBSA dQ/dK/dV against dense SDPA's backward.

    python -m bench.bwd_kernel [--case sf5s] [--densities 0.25,0.125] [--tune] [--json out.json]
    python -m bench.bwd_kernel --sweep      # per-kernel device time of a few configs each
    python -m bench.bwd_kernel --fused-dq   # also dQ added by the dK/dV kernel (atomics)

The kernel benchmark's case (q 4680 × kv 32760, 12 heads × 128, bf16, BLHD, contiguous K/V)
and table. SDPA's backward is timed as torch.autograd.grad of its output (cuDNN/flash, what
the dispatcher picks); pbsa's as `pbsa_backward(..., backend="triton")` from the forward's
saved LSE. TFLOP/s count 2.5× the forward's 4·Lq·Lk·D per head over the computed tokens
(whole listed pages for pbsa), so `per_block_vs_sdpa` is throughput per computed block.
`--sweep` (the profile behind a tuning decision) times delta, dQ and dK/dV separately under
torch.profiler for the default configs and for a short list of dQ and dK/dV configs (the
other kernel at its default). `--fused-dq` times FUSED_TILES with `LaunchConfig.fused_dq` (one
kernel for dK, dV and dQ, dQ by float atomics: not deterministic) and records the fastest
as impl "pbsa_fused", with its dQ's largest difference from the split kernels'. Prints a
table last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import cuda_kernels, device_record, device_time_us, sync, time_ms, write_json
from bench.kernel import computed_tokens
from codegen.backward import pbsa_backward
from codegen.config import LaunchConfig
from codegen.launch import pbsa_triton
from codegen.launch_bwd import default_backward_configs, pbsa_backward_triton
from codegen.problem import validate
from codegen.samples import CASES, PAGE, Q_BLOCK, build_table, case_tensors
from codegen.tuning import autotune_backward
from sparsify.tables import format_table


def tflops(case, tokens: float, ms: float) -> float:
    return 2.5 * 4 * case.q_len * tokens * case.head_dim * case.heads / (ms * 1e-3) / 1e12


# (block_m, block_n, num_warps, num_stages): dQ walks keys block_n at a time for block_m
# query rows; dK/dV owns block_n keys and streams block_m query rows a step. Mostly tiles
# that ptxas (triton 3.6/3.7, sm_90a) compiles without spills now that the loads pipeline.
SWEEP = {
    "bwd_dq": [(128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3),
               (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (128, 128, 8, 2)],
    "bwd_dkdv": [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
                 (16, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2)],
}  # fmt: skip


# dK/dV tiles that also add dQ (block_m, block_n, num_warps, num_stages): of the 54 of the
# dK/dV search space, pipelined ones that ptxas (triton 3.6, sm_90a, `codegen.aot`) fits in
# registers without spills and holding 128 or 64 keys (4-warp tiles of 128 keys spill 2-4 KB).
FUSED_TILES = [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 2), (16, 128, 8, 2)]

KERNELS = ("bwd_delta", "bwd_dq", "bwd_dkdv", "bwd_fused")


def kernel_ms(fn, reps: int = 10) -> dict[str, float]:
    """Mean device milliseconds per call of each backward kernel (KERNELS) launched by `fn`,
    from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync()
    out = dict.fromkeys(KERNELS, 0.0)
    for e in cuda_kernels(prof):
        for kernel in out:
            if e.key.endswith(kernel):
                out[kernel] += device_time_us(e) / 1e3 / reps
    return out


def sweep(p, out, lse, grad_out, density: float) -> list[dict]:
    """Rows (density, kernel, config, ms) of each swept config, the other kernel at its
    default."""
    defaults = default_backward_configs(p, interpret=False)
    rows = []
    for slot, kernel in enumerate(("bwd_dq", "bwd_dkdv")):
        for block_m, block_n, warps, stages in SWEEP[kernel]:
            if p.q_block % block_m or p.page_size % block_n:
                continue
            config = LaunchConfig(block_m, warps, stages, block_n=block_n)
            pair = (config, defaults[1]) if slot == 0 else (defaults[0], config)
            try:
                ms = kernel_ms(
                    lambda pair=pair: pbsa_backward_triton(p, out, lse, grad_out, configs=pair)
                )
            except Exception as error:  # a config that cannot compile (shared memory, ...)
                print(f"  {kernel} {config}: {type(error).__name__}: {str(error)[:120]}")
                continue
            label = f"m{block_m} n{block_n} w{warps} s{stages}"
            rows.append(dict(density=density, kernel=kernel, config=label, ms=ms[kernel]))
            print(f"  {density} {kernel} {label}: {ms[kernel]:.3f} ms", flush=True)
    return rows


def fastest_fused(p, out, lse, grad_out, density: float):
    """(ms, config, call) of the fastest of FUSED_TILES and the default (tuned, after
    `--tune`) fused config; None if none compiled."""
    dq_config, default = default_backward_configs(p, interpret=False, deterministic=False)
    tiles = [LaunchConfig(m, w, s, block_n=n, fused_dq=True) for m, n, w, s in FUSED_TILES]
    best = None
    for tile in dict.fromkeys([default, *tiles]):
        if p.q_block % tile.block_m or p.page_size % (tile.block_n or p.page_size):
            continue

        def call(tile=tile):
            return pbsa_backward_triton(p, out, lse, grad_out, configs=(dq_config, tile))

        try:
            ms = time_ms(call)
        except Exception as error:  # a tile this Triton/device cannot build
            print(f"  fused {tile}: {type(error).__name__}: {str(error)[:120]}")
            continue
        print(f"  {density} fused {tile}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, tile, call)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="sf5s", choices=sorted(CASES))
    parser.add_argument("--densities", default="0.25,0.125,0.0625")
    parser.add_argument("--tune", action="store_true", help="autotune_backward first")
    parser.add_argument("--sweep", action="store_true", help="per-kernel times of a few configs")
    parser.add_argument(
        "--fused-dq", action="store_true", help="also dQ added by the dK/dV kernel (atomics)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.bwd_kernel: needs a CUDA device")
    dev = torch.device("cuda")
    case = CASES[args.case]
    q, k, v, *_ = case_tensors(case, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    grad_out = torch.randn(q.shape, generator=g, device=dev).to(q.dtype)

    # Dense SDPA backward (BHLD views; the graph is kept and re-differentiated).
    leaves = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
    dense_out = F.scaled_dot_product_attention(*leaves)
    dense_grad = grad_out.transpose(1, 2)
    sdpa_ms = time_ms(lambda: torch.autograd.grad(dense_out, leaves, dense_grad, retain_graph=True))
    sdpa_tf = tflops(case, case.kv_tokens, sdpa_ms)
    records = [dict(impl="sdpa_dense", density=1.0, bwd_ms=sdpa_ms, tflops=sdpa_tf)]
    swept: list[dict] = []
    for density in (float(d) for d in args.densities.split(",")):
        nb, idx = build_table(case, density, dev)
        call = dict(q_block=Q_BLOCK, page_size=PAGE)
        if args.tune:
            # with --fused-dq the dK/dV kernel that adds dQ is tuned too ("bwd_fused")
            autotune_backward(
                q, k, v, nb, idx, **call, progress=False, deterministic=not args.fused_dq
            )
        p = validate(q, k, v, nb, idx, **call)
        out, lse = pbsa_triton(p)
        split = kernel_ms(lambda p=p, out=out, lse=lse: pbsa_backward_triton(p, out, lse, grad_out))
        if args.sweep:
            swept += sweep(p, out, lse, grad_out, density)
        ms = time_ms(
            lambda p=p, out=out, lse=lse: pbsa_backward(p, out, lse, grad_out, backend="triton")
        )
        tokens = computed_tokens(case, nb)

        def rates(ms: float, tokens=tokens) -> dict:
            tf = tflops(case, tokens, ms)
            return dict(bwd_ms=ms, tflops=tf, speedup_vs_sdpa=sdpa_ms / ms,
                        per_block_vs_sdpa=tf / sdpa_tf)  # fmt: skip

        dq_config, dkdv_config = default_backward_configs(p, interpret=False)
        records.append(
            dict(
                impl="pbsa",
                density=density,
                deterministic=True,
                **rates(ms),
                **{f"{k}_ms": v for k, v in split.items()},
                dq_config=str(dq_config),
                dkdv_config=str(dkdv_config),
            )
        )
        best = fastest_fused(p, out, lse, grad_out, density) if args.fused_dq else None
        if best is not None:
            fused_ms, tile, call = best
            split_dq = pbsa_backward(p, out, lse, grad_out, backend="triton")[0]
            records.append(
                dict(
                    impl="pbsa_fused",
                    density=density,
                    deterministic=False,  # dQ by float atomics
                    **rates(fused_ms),
                    speedup_vs_split=ms / fused_ms,
                    max_abs_dq_diff_vs_split=float((call()[0] - split_dq).abs().max()),
                    **{f"{k}_ms": v for k, v in kernel_ms(call).items()},
                    dkdv_config=str(tile),
                )
            )
    payload = dict(device=device_record(), case=case.name, records=records, sweep=swept)
    write_json(args.json, payload)
    if swept:
        print(format_table(swept, list(swept[0])))
    columns = ["impl", "density", "bwd_ms", "tflops", "speedup_vs_sdpa", "per_block_vs_sdpa"]
    columns += [f"{k}_ms" for k in KERNELS]
    if args.fused_dq:
        columns += ["speedup_vs_split", "max_abs_dq_diff_vs_split"]
    print(format_table(records, columns))
    return records


if __name__ == "__main__":
    main()
