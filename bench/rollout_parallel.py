"""Head-parallel rollout benchmark: per-rank KV bytes and the speed-up over one process.

    torchrun --nproc-per-node N -m bench.rollout_parallel --json out.json \\
        [--preset wan2.1-1.3b] [--horizons 5s,20s] [--impls dense,sparse,sparse_dense]

N must divide the model's kv heads (1.3B: 12 → 2, 3, 4, 6). NCCL on CUDA (one GPU per
rank), gloo on the CPU. The implementations are `bench.rollout`'s, each head-parallel
(`runtime.parallel`): ``dense`` is Self-Forcing's eager cache holding each rank's heads
(`HeadParallelEagerRunner`), ``sparse`` / ``sparse_dense`` are ``sparsify(...,
parallel="heads")`` with the default PersistentLocal / the dense baseline's window. Unless
``--no-baseline``, rank 0 first times the same rollout in one process (the other ranks wait),
so ``speedup`` is one process's seconds over the slowest rank's.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist

from bench.common import device_record, write_json
from bench.rollout import HORIZONS, WARMUP_CHUNKS, run_rollout
from patterns import Dense
from runtime import (
    CausalWanModel,
    EagerRunner,
    HeadParallelEagerRunner,
    WanConfig,
    self_forcing_cache,
)
from runtime.eager import SELF_FORCING_WINDOW_FRAMES
from sparsify import sparsify
from sparsify.commands.distributed import is_main_rank, join_torchrun
from sparsify.defaults import default_geometry, default_pattern, example_chunk
from sparsify.tables import format_table

COLUMNS = [
    "horizon",
    "impl",
    "ranks",
    "seconds",
    "single_seconds",
    "speedup",
    "rank_peak_kv_bytes",
    "single_peak_kv_bytes",
    "kv_fraction",
]


def _timed(runner, config, context, chunks: int) -> dict:
    """A warm-up rollout, then the timed one (as `bench.rollout` does)."""
    run_rollout(runner, config, context, min(chunks, WARMUP_CHUNKS))
    return run_rollout(runner, config, context, chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--horizons", default="5s,20s")
    parser.add_argument("--impls", default="dense,sparse,sparse_dense")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1-process runs")
    parser.add_argument("--no-compile", action="store_true", help="sparse graphs uncompiled")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="sparse passes eager")
    args = parser.parse_args(argv)

    device = join_torchrun()
    world = dist.get_world_size()
    # the waits for rank 0's one-process runs outlast NCCL's default timeout: wait on gloo
    waiting = dist.new_group(backend="gloo", timeout=timedelta(hours=3))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_graphs = device.type == "cuda" and not args.no_compile
    config = WanConfig.preset(args.preset)
    model = CausalWanModel(config).to(device, dtype).eval()
    # drawn on the CPU from a seed: the same context on every rank
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    context = context.to(device, dtype)
    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    example = example_chunk(config, context)
    patterns = {
        "sparse": default_pattern(geometry),
        "sparse_dense": Dense(window_frames=SELF_FORCING_WINDOW_FRAMES),
    }
    impls = args.impls.split(",")

    def sparse_runner(impl: str, parallel: str | None):
        module = sparsify(
            model,
            example,
            patterns[impl],
            geometry=geometry,
            cuda_graphs=not args.no_cuda_graphs,
            parallel=parallel,
        )
        if compile_graphs:
            module.compile()
        return module

    parallel_runners = {i: sparse_runner(i, "heads") for i in impls if i in patterns}
    card, records = device_record(), []
    for name in args.horizons.split(","):
        horizon = HORIZONS[name]
        for impl in impls:
            record = dict(horizon=name, impl=impl, ranks=world, chunks=horizon.chunks)
            if not args.no_baseline:
                if is_main_rank():
                    if impl == "dense":
                        single = EagerRunner(model, self_forcing_cache(horizon.latent_frames))
                    else:
                        single = sparse_runner(impl, None)
                    done = _timed(single, config, context, horizon.chunks)
                    record["single_seconds"] = done["seconds"]
                    record["single_peak_kv_bytes"] = done["peak_kv_bytes"]
                    del single
                dist.barrier(group=waiting)
            if impl == "dense":
                cache = self_forcing_cache(horizon.latent_frames)
                runner = HeadParallelEagerRunner(model, cache)
            else:
                runner = parallel_runners[impl]
            dist.barrier(group=waiting)
            done = _timed(runner, config, context, horizon.chunks)
            ranks: list = [None] * world
            dist.all_gather_object(ranks, (done["seconds"], done["peak_kv_bytes"]), group=waiting)
            record["rank_seconds"] = [s for s, _ in ranks]
            record["rank_peak_kv_bytes"] = [b for _, b in ranks]
            record["seconds"] = max(record["rank_seconds"])
            record["peak_cuda_bytes"] = done["peak_cuda_bytes"]
            if "single_seconds" in record:
                record["speedup"] = record["single_seconds"] / record["seconds"]
                single_bytes = record["single_peak_kv_bytes"]
                record["kv_fraction"] = max(record["rank_peak_kv_bytes"]) / single_bytes
            records.append(record)
            if is_main_rank():
                print(record, flush=True)
                payload = dict(device=card, preset=args.preset, ranks=world, records=records)
                write_json(args.json, payload)
    if is_main_rank():
        rows = [dict(r, rank_peak_kv_bytes=max(r["rank_peak_kv_bytes"])) for r in records]
        print(format_table(rows, COLUMNS))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
