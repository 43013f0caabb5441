"""One launch of each kernel-benchmark implementation inside a CUDA profiler range, for ncu.

    ncu --clock-control none --profile-from-start off --set full -o prof \\
        python -m bench.kernel_ncu --case sf5s --density 0.125

PBSA (contiguous and paged) is autotuned first, and every implementation is run a few times
before the range opens, so ncu sees one steady launch of each and no compile or tuning work.
FlashAttention-4's block-sparse forward (`bench.kernel`'s peer) is included when it imports.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.kernel import fa4_block_sparse, fa4_runner, pbsa_variants
from codegen.samples import CASES, PAGE, Q_BLOCK, build_table, case_tensors

WARMUP_CALLS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="sf5s", choices=sorted(CASES))
    parser.add_argument("--density", type=float, default=0.125)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernel_ncu needs a CUDA device", file=sys.stderr)
        return 2
    import codegen
    from codegen.tuning import autotune

    case = CASES[args.case]
    if args.density not in case.densities:
        parser.error(f"--density: expected one of {case.densities} for {case.name}")
    dev = torch.device("cuda")
    q, k, v, k_pool, v_pool, page_lens = case_tensors(case, dev)
    counts, idx = build_table(case, args.density, dev)
    kw = dict(layout="BLHD", q_block=Q_BLOCK, page_size=PAGE)
    calls = {}
    for impl, a in pbsa_variants(q, k, v, (k_pool, v_pool, page_lens), counts, idx).items():
        print(impl, autotune(*a, **kw, progress=False), flush=True)
        calls[impl] = lambda a=a: codegen.pbsa_attention(*a, **kw)
    try:
        fa4 = fa4_runner(q, k, v)
        sparse = fa4_block_sparse(case, counts, idx)
        calls["fa4"] = lambda: fa4(sparse)
    except ImportError as err:
        print(f"fa4: not profiled ({err})", file=sys.stderr)
    for fn in calls.values():
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for impl, fn in calls.items():
        torch.cuda.nvtx.range_push(impl)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(calls), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
