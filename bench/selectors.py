"""Table builders for `bench.kernel --selector`, so `select_overhead` is a measured number.

    python -m bench.kernel --selector bench.selectors:persistent_local
    python -m bench.selectors --json out.json   # the selector against PBSA alone (fast)

`persistent_local` lays the case's KV out as the runtime would — 32 persistent pages, then the
window's history frames and the current chunk, each frame tiled into 13 pages of 128 — and
times what one layer does per denoising pass to build its table: pool the chunk's queries
into block representatives, score them against the pages' key representatives, take each
query block's top-K window pages, add the persistent pages and the own frames, emit the
table. The per-chunk layout is memoised as in the eager runtime (built once, reused by the
passes).

On CUDA the pattern builds the table with the three fused kernels of `patterns.select_kernel`
(it reads the raw queries and the cache's layout buffers directly). `python -m bench.selectors`
times it eagerly (`select_ms`) and as the runtime runs it, replayed from a CUDA graph
(`select_graph_ms`): the device time of table building without the Python and launch cost.
`torch_graph_ms` is the torch path (pooling, scoring, top-K, table; ~30 kernels), replayed from
a graph with the per-chunk layout rebuilt inside at every replay, as before the fused kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from bench.common import device_record, time_ms, write_json
from codegen.samples import CASES, PAGE, Q_BLOCK, KernelCase, build_table
from patterns import BlockScorer, BlockTable, CacheView, PersistentLocal, pool_query_blocks
from sparsify.defaults import default_geometry
from sparsify.tables import format_table


def persistent_local(
    case: KernelCase,
    density: float,
    q: Tensor,
    k: Tensor,
    fresh_layout: bool = False,
    fused: bool = True,
) -> Callable[[], object]:
    """The default pattern's selection at this case's shape; q [1, Lq, H, D], k [1, Lk, H, D].
    fresh_layout: rebuild the per-chunk layout at every call (as a graph replay does).
    fused: give the pattern the raw queries, so on CUDA it takes the fused-kernel path
    (`patterns.select_kernel`); False pools them first and runs the torch path."""
    g = default_geometry(case.tokens_per_frame)
    persistent = case.persistent_tokens // g.page_size
    window_frames = round((case.kv_tokens - case.persistent_tokens) / case.tokens_per_frame)
    history = window_frames - g.frames_per_chunk
    heads, device = case.heads, q.device
    num_pages = persistent + window_frames * g.pages_per_frame

    def ids(start: int, *shape: int) -> Tensor:
        count = int(torch.Size(shape).numel())
        grid = torch.arange(start, start + count, device=device).view(*shape)
        return grid.expand(1, heads, *shape)

    page_lens = g.frame_page_lens(device).repeat(window_frames)
    page_lens = torch.cat(
        [torch.full((persistent,), g.page_size, device=device, dtype=page_lens.dtype), page_lens]
    )
    # The pool keeps each page's mean key (written with the page, not per pass); the
    # case's keys tile 128-token blocks, not 13-page frames, so use their block means.
    blocks = k[:, : (k.shape[1] // g.page_size) * g.page_size].unflatten(1, (-1, g.page_size))
    key_reps = (
        blocks.float().mean(2).transpose(1, 2)[:, :, torch.arange(num_pages) % blocks.shape[1]]
    )
    view = CacheView(
        geometry=g,
        num_heads=heads,
        chunk_start=history,
        history_frames=tuple(range(history)),
        frame_index=torch.arange(history, device=device),
        frame_pages=ids(persistent, history, g.pages_per_frame),
        chunk_pages=ids(
            persistent + history * g.pages_per_frame, g.frames_per_chunk, g.pages_per_frame
        ),
        persistent_pages=ids(0, persistent),
        page_lens=page_lens.expand(1, heads, -1),
        key_reps=key_reps.contiguous(),
        scorer=BlockScorer(heads, heads, q.shape[-1]).to(device),
    )
    pattern = PersistentLocal(
        persistent_blocks=persistent, window_frames=window_frames, local_density=density
    )

    def select() -> object:
        if fresh_layout:
            view.layout.clear()
        if fused:
            return pattern.select(dataclasses.replace(view, queries=q))
        reps = pool_query_blocks(q, g.q_block)
        return pattern.select(dataclasses.replace(view, query_reps=reps))

    return select


def rows_equal(a: BlockTable, b: BlockTable) -> float:
    """Share of table rows that list the same pages (both tables are sorted, zero-padded)."""
    same = (a.kv_num_blocks == b.kv_num_blocks) & (a.kv_indices == b.kv_indices).all(-1)
    return float(same.float().mean())


def kernel_us(fn: Callable[[], object], repeats: int = 20) -> dict[str, float]:
    """Device time per call of each kernel that ``fn`` launches (µs, from the profiler)."""
    fn()
    torch.cuda.synchronize()
    activity = torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return {
        e.key[:60]: round(e.device_time_total / repeats, 2)
        for e in prof.key_averages()
        if e.device_time_total > 0
    }


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after one eager call that warms its caches)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv: list[str] | None = None) -> int:
    """Time the selector and the PBSA kernel (autotuned, contiguous KV) on the
    same case, table and process: `select_overhead` = select ms / pbsa ms."""
    import codegen

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--cases", default="paper65k")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--profile", action="store_true", help="also record each kernel's device time"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.selectors needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    records = []
    for name in args.cases.split(","):
        case = CASES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        shape_q = (1, case.q_len, case.heads, case.head_dim)
        shape_kv = (1, case.kv_tokens, case.heads, case.head_dim)
        q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, generator=g)
        k, v = (
            torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2)
        )
        for density in case.densities:
            counts, idx = build_table(case, density, dev)
            call, kw = (q, k, v, counts, idx), dict(q_block=Q_BLOCK, page_size=PAGE)
            # the overhead is measured against the tuned kernel, the demanding comparison
            codegen.autotune(*call, **kw, return_lse=False, progress=False)
            pbsa_ms = time_ms(
                lambda call=call, kw=kw: codegen.pbsa_attention(*call, **kw, return_lse=False)
            )
            fused_table = persistent_local(case, density, q, k)()
            torch_table = persistent_local(case, density, q, k, fused=False)()
            select_ms = time_ms(persistent_local(case, density, q, k))
            graph_ms = time_ms(graph_replay(persistent_local(case, density, q, k)))
            torch_graph_ms = time_ms(
                graph_replay(persistent_local(case, density, q, k, fresh_layout=True, fused=False))
            )
            records.append(
                dict(
                    case=name,
                    density=density,
                    pbsa_ms=pbsa_ms,
                    select_ms=select_ms,
                    select_overhead=select_ms / pbsa_ms,
                    select_graph_ms=graph_ms,
                    select_graph_overhead=graph_ms / pbsa_ms,
                    torch_graph_ms=torch_graph_ms,
                    torch_graph_overhead=torch_graph_ms / pbsa_ms,
                    rows_equal=rows_equal(fused_table, torch_table),
                )
            )
            if args.profile:
                records[-1]["kernels_us"] = kernel_us(persistent_local(case, density, q, k))
    write_json(args.json, dict(device=device_record(), records=records))
    columns = [c for c in records[0] if c != "kernels_us"]
    for rec in records:
        for name, us in rec.get("kernels_us", {}).items():
            print(f"{rec['density']:<8} {us:8.2f} us  {name}")
    print(format_table(records, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
