"""`sparsify autotune`: tune the PBSA kernel for the kernel benchmark's shapes (GPU).

For each case and density of `codegen.samples.CASES` (B=1, H=12, D=128, bf16, Lq 4680) it
builds the benchmark's block table and runs `codegen.tuning` on contiguous and paged K/V;
winners are stored in the kernel cache dir (`autotune.json`) and used by every later call of
that shape.
"""

from __future__ import annotations

import argparse

from sparsify.commands.args import name_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from codegen.samples import CASES

    names = ", ".join(f"{n} ({c.kv_tokens} KV tokens)" for n, c in CASES.items())
    parser.add_argument(
        "--cases",
        type=name_list(list(CASES)),
        default=",".join(CASES),
        help=f"comma-separated cases to tune, from: {names}",
    )
    parser.add_argument("--force", action="store_true", help="re-time even if a winner exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from codegen import autotune
    from codegen.cache import cache_dir
    from codegen.samples import CASES, PAGE, Q_BLOCK, build_table, case_tensors
    from sparsify.tables import format_table

    if not torch.cuda.is_available():
        print("sparsify autotune: no CUDA device; the interpreter uses one fixed config")
        return 0
    dev = torch.device("cuda")
    rows = []
    for name in args.cases:
        case = CASES[name]
        q, k, v, k_pool, v_pool, lens = case_tensors(case, dev)
        for density in case.densities:
            counts, idx = build_table(case, density, dev)
            for mode, kv in (
                ("contiguous", (k, v, counts, idx)),
                ("paged", (k_pool, v_pool, counts, idx, lens)),
            ):
                config = autotune(q, *kv, q_block=Q_BLOCK, page_size=PAGE, force=args.force)
                rows.append(dict(case=name, density=density, kv=mode, config=str(config)))
    print(f"winners stored in {cache_dir() / 'autotune.json'}")
    print(format_table(rows, ["case", "density", "kv", "config"]))
    return 0
