"""Kernel benchmark (BENCHMARKS.md): PBSA vs dense SDPA vs compiled FlexAttention.

    python -m bench.kernel --json out.json [--cases sf5s,paper65k] [--sweep]

B=1, H=12, D=128, bf16, BLHD, one chunk of 3 frames x 1560 queries. The KV is one contiguous
sequence: 4096 persistent tokens (32 pages of 128) visible to every query block, then the
window, whose last 3 frames are the current chunk. Each query block sees the persistent
pages, its own frames' pages and a seeded random `density` fraction of the other window
pages. SDPA, flex and pbsa read the same memory; pbsa is also timed on a paged pool. After
flex is compiled and pbsa autotuned for every density, each implementation is timed in
`ROUNDS` interleaved rounds and reported by its median (`rounds_ms` keeps them all).

FlashAttention-4's block-sparse forward (`flash-attn-4`, CuTe DSL) is the block-sparse peer
(`fa4`): the same visible 128x128 blocks, read from the same BLHD memory, and FA4 without
sparsity beside cuDNN (`fa4_dense`). Where the package is missing or refuses the problem,
the JSON's `fa4_unavailable` says why and the other implementations are timed as usual.

The block-table builder of the pattern library can be timed too (`select_overhead`): pass
`--selector module:function` (e.g. `bench.selectors:persistent_local`) or `selector=` to
`run_case`. A builder is called as `builder(case, density, q, k)` and returns a zero-argument
callable that does the selection; without one `select_overhead` is null.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import device_record, time_ms, write_json
from codegen.samples import CASES, PAGE, Q_BLOCK, KernelCase, build_table, case_tensors
from sparsify.tables import format_table

Selector = Callable[[KernelCase, float, Tensor, Tensor], Callable[[], object]]


def computed_tokens(case: KernelCase, counts: Tensor) -> float:
    """Mean KV tokens computed per query row (whole pages, as every kernel computes them)."""
    rows = torch.full((case.num_q_blocks,), Q_BLOCK, dtype=torch.float64)
    rows[-1] = case.q_len - (case.num_q_blocks - 1) * Q_BLOCK
    per_block = counts[0].double().cpu() * PAGE  # [H, Mq]
    return float((per_block * rows).sum() / (case.heads * case.q_len))


def flex_block_mask(case: KernelCase, counts: Tensor, idx: Tensor):
    """A BlockMask equal to the table: whole pages are full blocks, the partial last page
    (Lk not a multiple of 128) a masked block."""
    from torch.nn.attention.flex_attention import BlockMask

    # FlexAttention wants one column per kv block (it transposes the table by scatter).
    idx = F.pad(idx, (0, case.num_pages - idx.shape[-1]))
    last = case.num_pages - 1
    has_last = (idx == last) & (torch.arange(idx.shape[-1], device=idx.device) < counts[..., None])
    has_last = has_last.any(-1)
    partial = case.kv_tokens % PAGE != 0
    if partial:
        full_counts = counts - has_last.to(torch.int32)  # the last page is listed last
        part_counts = has_last.to(torch.int32)
        part_idx = torch.full_like(idx, 0)
        part_idx[..., 0] = last
    else:
        full_counts, part_counts, part_idx = counts, torch.zeros_like(counts), idx
    kv_len = case.kv_tokens
    # mask_mod must state the whole mask (eager flex evaluates it densely); compiled flex
    # evaluates it only on partial blocks, so the lookup costs nothing on full pages.
    slots = torch.arange(idx.shape[-1], device=idx.device)
    visible = torch.zeros(*idx.shape[:3], case.num_pages + 1, dtype=torch.bool, device=idx.device)
    visible.scatter_(3, torch.where(slots < counts[..., None], idx, case.num_pages).long(), True)
    visible = visible[0, ..., : case.num_pages]  # [H, Mq, NP]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < kv_len) & visible[h, q_idx // Q_BLOCK, kv_idx // PAGE]

    return BlockMask.from_kv_blocks(
        part_counts,
        part_idx,
        full_counts,
        idx,
        BLOCK_SIZE=(Q_BLOCK, PAGE),
        mask_mod=mask_mod,
        seq_lengths=(case.q_len, kv_len),
    )


def pbsa_variants(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pool: tuple[Tensor, Tensor, Tensor],
    counts: Tensor,
    idx: Tensor,
) -> dict[str, tuple]:
    """`codegen.pbsa_attention`'s positional arguments per benchmarked variant: `pbsa` on the
    contiguous K/V, `pbsa_paged` on the page pool `(k_pool, v_pool, page_lens)`."""
    k_pool, v_pool, page_lens = pool
    return {
        "pbsa": (q, k, v, counts, idx, None),
        "pbsa_paged": (q, k_pool, v_pool, counts, idx, page_lens),
    }


# FA4's outputs must agree with the reference (SDPA dense, flex sparse) to this max abs
# difference to be timed: 4x the largest bf16 disagreement seen between flex, PBSA and FA4
# on these cases (4.9e-4). A block-sparse peer that masked wrongly would be timed on other work.
FA4_MAX_ABS_DIFF = 2e-3


def fa4_block_sparse(case: KernelCase, counts: Tensor, idx: Tensor) -> object:
    """FA4's block-sparse tensors for the table: every visible page a full 128x128 block.

    FA4 wants one index column per kv block (as flex does), and walks a row's blocks from the
    last listed to the first, masking the sequence end on the first one it computes: the
    partial last page whenever a row sees it (the table lists pages in ascending order), so
    no mask_mod is needed."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    idx = F.pad(idx, (0, case.num_pages - idx.shape[-1]))
    return BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(counts),
        mask_block_idx=idx,
        full_block_cnt=counts,
        full_block_idx=idx,
        block_size=(Q_BLOCK, PAGE),
    )


def _check_fa4(out: Tensor, reference: Tensor) -> float:
    """FA4's max abs difference from the BLHD-transposed reference; raises past the bound."""
    err = float((out.float() - reference.transpose(1, 2).float()).abs().max())
    if not err <= FA4_MAX_ABS_DIFF:
        raise ValueError(f"output differs from the reference by {err:.3g} > {FA4_MAX_ABS_DIFF}")
    return err


def fa4_runner(q: Tensor, k: Tensor, v: Tensor) -> Callable[..., Tensor]:
    """FA4's forward on these BLHD tensors (its native layout), with or without block
    sparsity. Raises ImportError where flash-attn-4 is not installed."""
    from runtime.compiled_dense import fa4_forward

    forward = fa4_forward()
    return lambda sparse=None: forward(q, k, v, block_sparse_tensors=sparse)


def sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def _record(case, density, impl, ms, computed, **extra) -> dict:
    tflops = 4 * case.q_len * computed * case.head_dim * case.heads / (ms * 1e-3) / 1e12
    return dict(
        case=case.name,
        density=density,
        impl=impl,
        ms=ms,
        computed_kv_tokens=computed,
        tflops=tflops,
        ideal_speedup=case.kv_tokens / computed,
        **extra,
    )


# Timed rounds per implementation. Every implementation of a case is timed once per round,
# in turn, after all tuning, and reported by its median: GPU clocks drift over the minutes a
# case takes (cuDNN SDPA measured 1.73-1.85 ms for sf5s across runs), and a baseline timed
# once before the autotuner's load would bias every ratio against the later timings.
ROUNDS = 5


def run_case(
    case: KernelCase, *, sweep: bool, seed: int = 0, selector: Selector | None = None
) -> tuple[list[dict], list[dict]]:
    """Records of one case (all densities) and, with sweep, every candidate config's time."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    import codegen
    from codegen.launch import pbsa_triton
    from codegen.problem import validate
    from codegen.tuning import autotune, candidate_configs

    dev = torch.device("cuda")
    q, k, v, k_pool, v_pool, page_lens = case_tensors(case, dev, seed)
    lk = case.kv_tokens
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # BHLD views of the same memory

    # The fastest SDPA backend is the baseline.
    sdpa_ms, dense_out = {}, None
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qt, kt, vt)
                sdpa_ms[name] = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
            dense_out = out if dense_out is None else dense_out
        except RuntimeError as err:
            print(f"sdpa {name}: unavailable ({str(err)[:80]})", file=sys.stderr)
    sdpa_name = min(sdpa_ms, key=sdpa_ms.get)

    sdpa_backend = sdpa_backends()[sdpa_name]

    def sdpa() -> None:
        with sdpa_kernel([sdpa_backend]):
            F.scaled_dot_product_attention(qt, kt, vt)

    # FA4 dense beside the SDPA backends; any failure (not installed, unsupported card or
    # problem) is recorded and FA4 left out of the rounds.
    fa4_unavailable, fa4 = None, None
    try:
        fa4 = fa4_runner(q, k, v)
        fa4_dense_err = _check_fa4(fa4(), dense_out)
    except Exception as err:  # noqa: BLE001 -- a peer that cannot run is reported, not fatal
        fa4_unavailable, fa4 = f"{type(err).__name__}: {str(err)[:300]}", None
        print(f"fa4: unavailable ({fa4_unavailable})", file=sys.stderr)

    # Per density: the table, flex's block mask, the tuned PBSA configs and their errors.
    flex = torch.compile(flex_attention, dynamic=False)
    qc, kc, vc = (t.contiguous() for t in (qt, kt, vt))
    kw = dict(layout="BLHD", q_block=Q_BLOCK, page_size=PAGE)
    timers: dict[tuple[float | None, str], Callable[[], object]] = {(None, "sdpa_dense"): sdpa}
    extras: dict[tuple[float | None, str], dict] = {}
    if fa4 is not None:
        timers[None, "fa4_dense"] = fa4
        extras[None, "fa4_dense"] = dict(max_abs_diff_vs_sdpa=fa4_dense_err)
    computed, select_ms, sweep_rows, full_out = {}, {}, [], None
    for density in case.densities:
        counts, idx = build_table(case, density, dev, seed)
        computed[density] = computed_tokens(case, counts)
        mask = flex_block_mask(case, counts, idx)
        flex_variants = {
            "blhd_view": lambda m=mask: flex(qt, kt, vt, block_mask=m),
            "bhld_contig": lambda m=mask: flex(qc, kc, vc, block_mask=m),
        }
        flex_all = {name: time_ms(fn) for name, fn in flex_variants.items()}
        timers[density, "flex"] = flex_variants[min(flex_all, key=flex_all.get)]
        extras[density, "flex"] = dict(flex_all_ms=flex_all)
        flex_out = flex(qt, kt, vt, block_mask=mask)
        if fa4 is not None:
            try:
                sparse = fa4_block_sparse(case, counts, idx)
                err = _check_fa4(fa4(sparse), flex_out)
                timers[density, "fa4"] = lambda s=sparse: fa4(s)
                extras[density, "fa4"] = dict(max_abs_diff_vs_flex=err)
            except Exception as err:  # noqa: BLE001 -- as above, per density
                reason = f"{type(err).__name__}: {str(err)[:300]}"
                fa4_unavailable = fa4_unavailable or f"block-sparse: {reason}"
                print(f"fa4 block-sparse at density {density}: {reason}", file=sys.stderr)
        for impl, a in pbsa_variants(q, k, v, (k_pool, v_pool, page_lens), counts, idx).items():
            config = autotune(*a, **kw, progress=False)
            out, _ = codegen.pbsa_attention(*a, **kw)
            err = float((out.float() - flex_out.transpose(1, 2).float()).abs().max())
            timers[density, impl] = lambda a=a: codegen.pbsa_attention(*a, **kw)
            extras[density, impl] = dict(config=str(config), max_abs_diff_vs_flex=err)
            if density == 1.0 and impl == "pbsa":
                full_out = out
            if sweep:
                p = validate(*a, scale=None, **kw)
                for c in candidate_configs(p):
                    try:
                        ms = time_ms(lambda c=c, p=p: pbsa_triton(p, config=c), warmup=10, rep=40)
                    except Exception as e:  # noqa: BLE001 -- record why a config cannot run
                        ms = f"{type(e).__name__}: {str(e)[:120]}"
                    sweep_rows.append(
                        dict(case=case.name, density=density, impl=impl, config=str(c), ms=ms)
                    )
        if selector is not None:
            select_ms[density] = time_ms(selector(case, density, q, k))

    # Timing rounds: every implementation in turn, ROUNDS times; medians.
    samples: dict[tuple[float | None, str], list[float]] = {key: [] for key in timers}
    for _ in range(ROUNDS):
        for key, fn in timers.items():
            samples[key].append(time_ms(fn))
    ms = {key: statistics.median(t) for key, t in samples.items()}

    base_ms = ms[None, "sdpa_dense"]
    records = [
        _record(
            case,
            None,
            "sdpa_dense",
            base_ms,
            float(lk),
            sdpa_backend=sdpa_name,
            sdpa_all_ms=sdpa_ms,
            rounds_ms=samples[None, "sdpa_dense"],
            speedup_vs_sdpa=1.0,
            efficiency=1.0,
        )
    ]
    if full_out is not None:
        records[0]["max_abs_diff_vs_pbsa_full"] = float(
            (full_out.float() - dense_out.transpose(1, 2).float()).abs().max()
        )
    if (None, "fa4_dense") in ms:
        t = ms[None, "fa4_dense"]
        records.append(
            _record(
                case,
                None,
                "fa4_dense",
                t,
                float(lk),
                speedup_vs_sdpa=base_ms / t,
                efficiency=base_ms / t,
                rounds_ms=samples[None, "fa4_dense"],
                **extras[None, "fa4_dense"],
            )
        )
    for density in case.densities:
        impls = ("flex", "fa4", "pbsa", "pbsa_paged")
        for impl in (i for i in impls if (density, i) in ms):
            t = ms[density, impl]
            rec = _record(
                case,
                density,
                impl,
                t,
                computed[density],
                speedup_vs_sdpa=base_ms / t,
                speedup_vs_flex=ms[density, "flex"] / t,
                rounds_ms=samples[density, impl],
                **extras[density, impl],
            )
            rec["efficiency"] = rec["speedup_vs_sdpa"] / rec["ideal_speedup"]
            if (density, "fa4") in ms:
                rec["speedup_vs_fa4"] = ms[density, "fa4"] / t
            if impl.startswith("pbsa"):
                sel = select_ms.get(density)
                rec["select_overhead"] = None if sel is None else sel / t
            records.append(rec)
    for rec in records:
        rec["fa4_unavailable"] = fa4_unavailable
    return records, sweep_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write records here")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--sweep", action="store_true", help="also time every candidate config")
    parser.add_argument("--selector", default=None, help="module:function table builder to time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernel needs a CUDA device", file=sys.stderr)
        return 2
    selector = None
    if args.selector:
        module, _, fn = args.selector.partition(":")
        selector = getattr(importlib.import_module(module), fn)
    records, sweep = [], []
    for name in args.cases.split(","):
        r, s = run_case(CASES[name], sweep=args.sweep, selector=selector)
        records += r
        sweep += s
    card = device_record()
    write_json(args.json, dict(device=card, records=records, sweep=sweep))
    cols = [
        "case",
        "density",
        "impl",
        "ms",
        "computed_kv_tokens",
        "tflops",
        "speedup_vs_sdpa",
        "speedup_vs_flex",
        "speedup_vs_fa4",
        "ideal_speedup",
        "efficiency",
    ]
    print(card)
    print(format_table(records, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
