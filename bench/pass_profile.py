"""Where a rollout's time goes, one pass at a time (a diagnostic beside `bench.rollout`).

    python -m bench.pass_profile [--preset wan2.1-1.3b] [--chunks 8] [--top 25]
        [--runners dense,sparse_graph,...] [--profile sparse_graph]

Runners (`--runners`, any of `RUNNERS`): the dense eager runner; `sparsify(model, default
PersistentLocal)` as captured (`sparse_graph`), compiled (`sparse_compiled`) and compiled with
its passes replayed as CUDA graphs (`sparse_cudagraph`, what `bench.rollout` runs); the same
runtime bound into the eager model (`sparse_eager`, no captured graph); and `sparsify(model,
Dense(21))` compiled with CUDA graphs (`sparse_dense_cudagraph`: what compiling and graphs
give without sparsity); `dense_compiled` is `runtime.CompiledDenseRunner` (`bench.rollout`'s
headline denominator). Each rolls out `--chunks` chunks, then times the next chunk's passes:
wall time with a device sync, and host time (how long the Python side takes to enqueue the
pass, without a sync — when it is close to the wall time the pass is host-bound); the median
of the denoising passes, and the commit.
Then it profiles one denoising pass of the `--profile` runner and prints the top operators by
host and device time. `--kernels R1,R2` profiles one denoising pass of each (CUDA graphs off
for it: the same kernels, launched one by one) and prints a compact table of the top kernels
by GPU time, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

from bench.common import cuda_kernels, device_time_us, sync
from patterns import Dense
from runtime import CausalWanModel, EagerRunner, WanConfig, reference_runner
from runtime.compiled_dense import CompiledDenseRunner
from runtime.eager import SELF_FORCING_WINDOW_FRAMES, self_forcing_cache
from runtime.pool import PagePool
from sparsify import sparsify
from sparsify.defaults import default_geometry, default_pattern, example_chunk
from sparsify.tables import format_table

RUNNERS = (
    "dense",
    "dense_compiled",
    "sparse_graph",
    "sparse_compiled",
    "sparse_cudagraph",
    "sparse_eager",
    "sparse_dense_cudagraph",
)


def _chunk_inputs(config: WanConfig, context):
    """x and timestep of one chunk (random: only the cache's shape matters for time)."""
    x, timestep, _, _ = example_chunk(config, context)
    return x, timestep


def roll(runner, config: WanConfig, context, chunks: int, extra: int = 1) -> None:
    """Reset for `chunks + extra` chunks and run the first `chunks` (4 denoising passes and
    a commit each; random inputs: only the cache's shape matters for time)."""
    frames = config.frames_per_chunk
    runner.reset(1, context.device, context.dtype, (chunks + extra) * frames)
    x, t = _chunk_inputs(config, context)
    for chunk in range(chunks):
        for commit in (False, False, False, False, True):
            runner(x, t, context, chunk * frames, commit=commit)


def time_passes(runner, config: WanConfig, context, chunks: int) -> dict:
    """Roll out `chunks` chunks, then time the next chunk's 4 denoising passes (median) and
    its commit pass, with the cyclic GC off."""
    roll(runner, config, context, chunks)
    x, t = _chunk_inputs(config, context)
    start = chunks * config.frames_per_chunk
    times: dict[str, list[tuple[float, float]]] = {"denoise": [], "commit": []}
    gc.collect()
    gc.disable()
    try:
        for commit in (False, False, False, False, True):
            sync()
            begin = time.perf_counter()
            runner(x, t, context, start, commit=commit)
            host = time.perf_counter() - begin
            sync()
            wall = time.perf_counter() - begin
            times["commit" if commit else "denoise"].append((wall, host))
    finally:
        gc.enable()
    result = {}
    for name, samples in times.items():
        result[f"{name}_ms"] = 1e3 * statistics.median(w for w, _ in samples)
        result[f"{name}_host_ms"] = 1e3 * statistics.median(h for _, h in samples)
    return result


def build_runner(name: str, model: CausalWanModel, config: WanConfig, context, num_frames: int):
    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    pattern = default_pattern(geometry)
    example = example_chunk(config, context)
    if name == "dense":
        return EagerRunner(model, self_forcing_cache(num_frames))
    if name == "dense_compiled":
        return CompiledDenseRunner(model)
    if name == "sparse_eager":
        return reference_runner(
            model,
            pattern,
            page_size=geometry.page_size,
            q_block=geometry.q_block,
            cuda_graphs=False,
        )
    if name == "sparse_dense_cudagraph":
        pattern = Dense(window_frames=SELF_FORCING_WINDOW_FRAMES)
    graphs = name.endswith("_cudagraph")
    runner = sparsify(model, example, pattern, geometry=geometry, cuda_graphs=graphs)
    if graphs or name.endswith("_compiled"):
        runner.compile()
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--chunks", type=int, default=8, help="chunks rolled out before timing")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--runners", default="dense,sparse_graph,sparse_eager")
    parser.add_argument("--profile", default="sparse_graph", help="runner to profile ('' for none)")
    parser.add_argument(
        "--kernels", default="", help="runners (of --runners) whose top kernels are tabled"
    )
    parser.add_argument(
        "--graphed",
        action="store_true",
        help="--kernels: profile the pass as replayed from its CUDA graph (default: launched "
        "one by one, which skips work a replay redoes, e.g. tables memoised per chunk)",
    )
    args = parser.parse_args(argv)
    if args.kernels and not torch.cuda.is_available():
        raise SystemExit("--kernels: kernel times need a CUDA device")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = WanConfig.preset(args.preset)
    model = CausalWanModel(config).to(device, dtype).eval()
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    num_frames = (args.chunks + 1) * config.frames_per_chunk
    rows, runners = [], {}
    for name in args.runners.split(","):
        if name not in RUNNERS:
            raise SystemExit(f"--runners: unknown {name!r}; expected some of {RUNNERS}")
        runner = runners[name] = build_runner(name, model, config, context, num_frames)
        with torch.no_grad():
            time_passes(runner, config, context, args.chunks)  # warm-up
            rows.append(dict(runner=name, **time_passes(runner, config, context, args.chunks)))
        print(rows[-1], flush=True)

    if args.profile:
        profile_pass(runners[args.profile], config, context, args.chunks, args.top)
    if args.kernels:
        kernel_rows = []
        for name in args.kernels.split(","):
            kernel_rows += kernel_table(
                name, runners[name], config, context, args.chunks, args.top, args.graphed
            )
        print(format_table(kernel_rows, list(kernel_rows[0])))
    print(format_table(rows, list(rows[0])))
    return 0


def profile_pass(sparse, config: WanConfig, context, chunks: int, top: int) -> None:
    """Print the top operators of one denoising pass by host and by device time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        roll(sparse, config, context, chunks)
        x, t = _chunk_inputs(config, context)
        start = chunks * config.frames_per_chunk
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sparse(x, t, context, start, commit=False)
            sync()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    print(
        averages.table(sort_by="self_cuda_time_total", row_limit=top // 2, max_name_column_width=60)
    )


def _kernel_kind(name: str) -> str:
    """A coarse class of a CUDA kernel name (for the per-pass sums)."""
    lowered = name.lower()
    for kind, marks in (
        ("table", ("_pool_queries", "_window_scores", "_table_kernel", "topk", "sort")),
        ("attention", ("attention", "attn", "fmha", "flash", "pbsa", "sdpa", "cudnn")),
        ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")),
        ("copy", ("copy", "memcpy", "memset", "index", "scatter", "gather", "cat")),
    ):
        if any(mark in lowered for mark in marks):
            return kind
    # what torch.compile fused (norms, modulation, RoPE, activations)
    return "inductor" if lowered.startswith("triton_") else "other"


SCRATCH_WRITE_RANGE = "runtime.PagePool.write_scratch"


@contextlib.contextmanager
def _named_scratch_writes():
    """Every `PagePool.write_scratch` call inside a profiler range of its own, so that the
    kernels it launches are counted as the scratch write, whatever their names."""
    from torch.autograd.profiler import record_function

    write = PagePool.write_scratch

    def named(self, *args, **kwargs):
        with record_function(SCRATCH_WRITE_RANGE):
            return write(self, *args, **kwargs)

    PagePool.write_scratch = named
    try:
        yield
    finally:
        PagePool.write_scratch = write


def kernel_table(
    name: str, runner, config: WanConfig, context, chunks: int, top: int, graphed: bool = False
) -> list:
    """Rows (runner, kernel, ms, share, calls) of the top kernels of one denoising pass by
    GPU time, then one row per kernel class and the pass total. graphed: profile the pass
    as its CUDA graph replays it (CUPTI records the kernels of a replay). Launched eagerly
    (not graphed), the sparse runners also get a `[scratch write]` row: the GPU time of the
    kernels that `PagePool.write_scratch` launched (also counted in their classes)."""
    from torch.profiler import ProfilerActivity, profile

    graphs = getattr(runner, "cuda_graphs", False) and not graphed
    if graphs:
        runner.cuda_graphs = False
    # a replayed graph runs no Python: the range would be empty
    activities = [ProfilerActivity.CUDA] + ([] if graphed else [ProfilerActivity.CPU])
    try:
        with torch.no_grad():
            roll(runner, config, context, chunks)
            x, t = _chunk_inputs(config, context)
            start = chunks * config.frames_per_chunk
            runner(x, t, context, start, commit=False)  # warm at this length, eagerly
            sync()
            names = contextlib.nullcontext() if graphed else _named_scratch_writes()
            with names, profile(activities=activities) as prof:
                runner(x, t, context, start, commit=False)
                sync()
    finally:
        if graphs:
            runner.cuda_graphs = True
    kernels = cuda_kernels(prof)
    total = sum(device_time_us(e) for e in kernels) or 1.0
    rows = [
        dict(
            runner=name,
            kernel=e.key[:60],
            ms=device_time_us(e) / 1e3,
            share=device_time_us(e) / total,
            calls=e.count,
        )
        for e in kernels[:top]
    ]
    kinds: dict[str, list] = {}
    for e in kernels:
        entry = kinds.setdefault(_kernel_kind(e.key), [0.0, 0])
        entry[0] += device_time_us(e)
        entry[1] += e.count
    for kind, (us, calls) in sorted(kinds.items()):
        rows.append(
            dict(runner=name, kernel=f"[{kind}]", ms=us / 1e3, share=us / total, calls=calls)
        )
    for e in prof.key_averages():
        if e.key == SCRATCH_WRITE_RANGE:
            us = device_time_us(e)
            rows.append(
                dict(runner=name, kernel="[scratch write]", ms=us / 1e3, share=us / total,
                     calls=e.count)
            )  # fmt: skip
    calls = sum(e.count for e in kernels)
    rows.append(dict(runner=name, kernel="[total]", ms=total / 1e3, share=1.0, calls=calls))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
