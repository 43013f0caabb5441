"""Backward kernels alone (GPU): PBSA dQ/dK/dV against dense SDPA's backward.

    python -m bench.bwd_kernel [--case sf5s] [--densities 0.25,0.125] [--tune] [--json out.json]

The kernel benchmark's case (q 4680 × kv 32760, 12 heads × 128, bf16, BLHD, contiguous K/V)
and table. SDPA's backward is timed as torch.autograd.grad of its output (cuDNN/flash, what
the dispatcher picks); pbsa's as `pbsa_backward(..., backend="triton")` from the forward's
saved LSE. TFLOP/s count 2.5× the forward's 4·Lq·Lk·D per head over the computed tokens
(whole listed pages for pbsa), so `per_block_vs_sdpa` is throughput per computed block.
Prints a table last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import device_record, time_ms, write_json
from bench.kernel import computed_tokens
from codegen.backward import pbsa_backward
from codegen.launch import pbsa_triton
from codegen.problem import validate
from codegen.samples import CASES, PAGE, Q_BLOCK, build_table, case_tensors
from codegen.tuning import autotune_backward
from sparsify.tables import format_table


def tflops(case, tokens: float, ms: float) -> float:
    return 2.5 * 4 * case.q_len * tokens * case.head_dim * case.heads / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="sf5s", choices=sorted(CASES))
    parser.add_argument("--densities", default="0.25,0.125,0.0625")
    parser.add_argument("--tune", action="store_true", help="autotune_backward first")
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
    for density in (float(d) for d in args.densities.split(",")):
        nb, idx = build_table(case, density, dev)
        call = dict(q_block=Q_BLOCK, page_size=PAGE)
        if args.tune:
            autotune_backward(q, k, v, nb, idx, **call, progress=False)
        p = validate(q, k, v, nb, idx, **call)
        out, lse = pbsa_triton(p)
        ms = time_ms(
            lambda p=p, out=out, lse=lse: pbsa_backward(p, out, lse, grad_out, backend="triton")
        )
        tf = tflops(case, computed_tokens(case, nb), ms)
        records.append(
            dict(
                impl="pbsa",
                density=density,
                bwd_ms=ms,
                tflops=tf,
                speedup_vs_sdpa=sdpa_ms / ms,
                per_block_vs_sdpa=tf / sdpa_tf,
            )
        )
    write_json(args.json, dict(device=device_record(), case=case.name, records=records))
    columns = ["impl", "density", "bwd_ms", "tflops", "speedup_vs_sdpa", "per_block_vs_sdpa"]
    print(format_table(records, columns))
    return records


if __name__ == "__main__":
    main()
