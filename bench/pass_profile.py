"""Where a rollout's time goes, one pass at a time (a diagnostic beside `bench.rollout`).

    python -m bench.pass_profile [--preset wan2.1-1.3b] [--chunks 8] [--top 25]

For the dense eager runner, `sparsify(model, default PersistentLocal)` and the same runtime
bound into the eager model (`StatefulRunner.for_reference_model`, no captured graph), it
rolls out `--chunks` chunks, then times one more chunk's denoising and commit passes: wall
time with a device sync, and host time (how long the Python side takes to enqueue the pass,
without a sync — when it is close to the wall time the pass is host-bound). Then it profiles
one denoising pass of the sparse runner and prints the top operators by host and device time.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import format_table, sync
from runtime import CausalWanModel, EagerRunner, StatefulRunner, WanConfig
from runtime.eager import self_forcing_cache
from sparsify import sparsify
from sparsify.defaults import default_geometry, default_pattern, example_chunk


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
    """Roll out `chunks` chunks, then time one denoising and one commit pass of the next."""
    roll(runner, config, context, chunks)
    x, t = _chunk_inputs(config, context)
    start = chunks * config.frames_per_chunk
    result = {}
    for name, commit in (("denoise", False), ("commit", True)):
        sync()
        begin = time.perf_counter()
        runner(x, t, context, start, commit=commit)
        host = time.perf_counter() - begin
        sync()
        result[f"{name}_ms"] = 1e3 * (time.perf_counter() - begin)
        result[f"{name}_host_ms"] = 1e3 * host
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--chunks", type=int, default=8, help="chunks rolled out before timing")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = WanConfig.preset(args.preset)
    model = CausalWanModel(config).to(device, dtype).eval()
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    pattern = default_pattern(geometry)
    num_frames = (args.chunks + 1) * config.frames_per_chunk
    runners = {
        "dense": EagerRunner(model, self_forcing_cache(num_frames)),
        "sparse_graph": sparsify(model, example_chunk(config, context), pattern, geometry=geometry),
        "sparse_eager": StatefulRunner.for_reference_model(
            model, pattern, page_size=geometry.page_size, q_block=geometry.q_block
        ),
    }
    rows = []
    for name, runner in runners.items():
        with torch.no_grad():
            time_passes(runner, config, context, args.chunks)  # warm-up
            rows.append(dict(runner=name, **time_passes(runner, config, context, args.chunks)))
        print(rows[-1], flush=True)

    from torch.profiler import ProfilerActivity, profile

    sparse = runners["sparse_graph"]
    with torch.no_grad():
        roll(sparse, config, context, args.chunks)
        x, t = _chunk_inputs(config, context)
        start = args.chunks * config.frames_per_chunk
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sparse(x, t, context, start, commit=False)
            sync()
    averages = prof.key_averages()
    print(
        averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
    )
    print(
        averages.table(
            sort_by="self_cuda_time_total", row_limit=args.top // 2, max_name_column_width=60
        )
    )
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
