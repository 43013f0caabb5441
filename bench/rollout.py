"""Rollout benchmark (BENCHMARKS.md): dense Self-Forcing vs `sparsify` on the reference model.

    python -m bench.rollout --json out.json [--preset wan2.1-1.3b] [--horizons 5s,20s,60s]

The `wan2.1-1.3b` reference model with seeded random weights in bf16, B=1, a random text
context of 512 x 4096, chunks of 3 latent frames, 4 denoising passes + 1 context pass each.
Implementations, each timed over the whole rollout of a horizon in one process:

* `dense`         — the model's own SDPA attention with the eager Self-Forcing cache (global up
                    to 21 frames, then a rolling 21-frame window without sink);
* `sparse`        — `sparsify(model, default PersistentLocal)`, its graph compiled and its
                    passes replayed as CUDA graphs (`--no-compile`, `--no-cuda-graphs` to
                    turn either off);
* `sparse_dense`  — `sparsify(model, Dense(...))` with the dense baseline's window, compiled
                    and graphed alike: what the rewrite, compiling and graphs give without
                    sparsity (the speed-up that sparsity alone gives is sparse over this).
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from dataclasses import dataclass

import torch

from bench.common import device_record, sync, write_json
from patterns import Dense
from runtime import CausalWanModel, EagerRunner, WanConfig, generate, self_forcing_cache
from runtime.eager import SELF_FORCING_WINDOW_FRAMES
from runtime.rollout import ChunkRunner
from sparsify import sparsify
from sparsify.defaults import default_geometry, default_pattern, example_chunk
from sparsify.tables import format_table


@dataclass(frozen=True)
class Horizon:
    name: str
    chunks: int

    @property
    def latent_frames(self) -> int:
        return 3 * self.chunks

    @property
    def pixel_frames(self) -> int:
        return 4 * self.latent_frames - 3


# Warm-up rollouts: dense attention lengths stop changing once the 21-frame window is full
# (chunk 7).
WARMUP_CHUNKS = SELF_FORCING_WINDOW_FRAMES // 3 + 1
HORIZONS = {h.name: h for h in (Horizon("5s", 7), Horizon("20s", 27), Horizon("60s", 80))}


def run_rollout(runner: ChunkRunner, config: WanConfig, context, chunks: int) -> dict:
    """Time one whole rollout; memory peaks are measured from a reset allocator."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # No cyclic-GC pauses inside the timed region, for every runner alike.
    gc.collect()
    gc.disable()
    try:
        sync()
        start = time.perf_counter()
        generate(
            runner,
            context,
            chunks,
            latent_shape=(config.in_channels, config.latent_height, config.latent_width),
            seed=0,
            progress=True,
        )
        sync()
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return dict(
        seconds=seconds,
        seconds_per_chunk=seconds / chunks,
        peak_kv_bytes=int(runner.peak_kv_bytes),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    )


def self_attention_modules(runner) -> list[torch.nn.Module]:
    """The modules that compute self-attention in a runner: the reference model's attention
    spellings for the eager baseline, the runtime's per-layer states for `sparsify`'s."""
    if isinstance(runner, EagerRunner):
        return [block.self_attn.attn for block in runner.model.blocks]
    return list(runner.runtime.states)


class _ProfiledRunner:
    """A runner that steps a profiler at every commit (one profiler step per chunk)."""

    def __init__(self, runner: ChunkRunner, profiler):
        self.runner, self.profiler = runner, profiler

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def __call__(self, x, timestep, context, start_frame, commit):
        out = self.runner(x, timestep, context, start_frame, commit)
        if commit:
            self.profiler.step()
        return out


SELF_ATTENTION_RANGE = "bench.self_attention"


def attention_fraction(runner: ChunkRunner, config: WanConfig, context, horizon: Horizon):
    """Share of GPU kernel time spent inside self-attention (for `sparsify`'s runner that
    includes building the block tables and the cache updates), from a profiled rollout:
    the whole rollout at 5 s, and a chunk in the steady state (21 frames of history) for the
    longer horizons, whose later chunks all look alike."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile, schedule

    # Replayed graphs run no module hooks: profile the same kernels launched eagerly.
    graphs = getattr(runner, "cuda_graphs", None)
    if graphs:
        runner.cuda_graphs = False

    chunks = min(horizon.chunks, WARMUP_CHUNKS)
    skip = 0 if chunks == horizon.chunks else chunks - 1
    ranges, handles = {}, []

    def enter(module, args):
        ranges[id(module)] = record_function(SELF_ATTENTION_RANGE).__enter__()

    def leave(module, args, out):
        ranges.pop(id(module)).__exit__(None, None, None)

    for module in self_attention_modules(runner):
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with warnings.catch_warnings():
            # warmup=0 is deliberate: the 5 s rollout is profiled from its first chunk
            warnings.filterwarnings("ignore", message=".*warmup.*|.*clears events.*")
            with profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                schedule=schedule(wait=skip, warmup=0, active=chunks - skip, repeat=1),
            ) as prof:
                run_rollout(_ProfiledRunner(runner, prof), config, context, chunks)
    finally:
        for handle in handles:
            handle.remove()
        if graphs:
            runner.cuda_graphs = True
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "device_time_total", None) or e.cuda_time_total
    total = sum(device_time(e) for e in events if e.device_type.name == "CUDA")
    attention = sum(device_time(e) for e in events if e.key == SELF_ATTENTION_RANGE)
    return attention / total if total else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--horizons", default="5s,20s,60s")
    parser.add_argument("--impls", default="dense,sparse,sparse_dense")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--fraction-horizons",
        default=None,
        help="horizons whose attention fraction is profiled (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="sparse runners uncompiled")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="sparse passes eager")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = WanConfig.preset(args.preset)
    print(f"set-up: building {args.preset} on {device}, random weights", flush=True)
    model = CausalWanModel(config).to(device, dtype).eval()
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    impls = args.impls.split(",")

    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    example = example_chunk(config, context)
    # Built once and reset per rollout: the graph is captured once for every horizon.
    patterns = {
        "sparse": default_pattern(geometry),
        # the dense baseline's cache policy on the sparse runtime: what the rewrite costs
        "sparse_dense": Dense(window_frames=SELF_FORCING_WINDOW_FRAMES),
    }
    rewritten = ", ".join(impl for impl in impls if impl in patterns)
    print(f"set-up: capturing and rewriting the graph for {rewritten}", flush=True)
    sparse_runners = {
        impl: sparsify(
            model, example, patterns[impl], geometry=geometry, cuda_graphs=not args.no_cuda_graphs
        )
        for impl in impls
        if impl in patterns
    }
    if not args.no_compile:
        for runner in sparse_runners.values():
            runner.compile()

    if not args.no_compile:
        print("warm-up: the first chunk of each sparse runner compiles it (minutes)", flush=True)
    card = device_record()
    records = []
    for name in args.horizons.split(","):
        horizon = HORIZONS[name]
        for impl in impls:
            if impl == "dense":
                runner = EagerRunner(model, self_forcing_cache(horizon.latent_frames))
            else:
                runner = sparse_runners[impl]
            # Warm-up over every KV length the timed run meets (cuDNN plans, kernels).
            print(f"{name} {impl}: warm-up rollout, then the timed one", flush=True)
            warmup = run_rollout(runner, config, context, min(horizon.chunks, WARMUP_CHUNKS))
            record = dict(horizon=name, impl=impl, chunks=horizon.chunks)
            # the cold cost (compiling, CUDA-graph captures) shows in the warm-up, not the run
            record["warmup_seconds"] = warmup["seconds"]
            record.update(run_rollout(runner, config, context, horizon.chunks))
            record["fps"] = horizon.pixel_frames / record["seconds"]
            if args.fraction_horizons is None or name in args.fraction_horizons.split(","):
                record["attention_fraction"] = attention_fraction(runner, config, context, horizon)
            records.append(record)
            base = next((r for r in records if r["horizon"] == name and r["impl"] == "dense"), None)
            if base is not None:
                record["speedup"] = base["seconds"] / record["seconds"]
                record["kv_reduction"] = 1.0 - record["peak_kv_bytes"] / base["peak_kv_bytes"]
            print(record, flush=True)
            # after every record, so that a run cut short keeps what it measured
            write_json(
                args.json,
                dict(
                    device=card,
                    preset=args.preset,
                    compiled=not args.no_compile,
                    cuda_graphs=not args.no_cuda_graphs,
                    records=records,
                ),
            )

    columns = [
        "horizon",
        "impl",
        "seconds",
        "seconds_per_chunk",
        "fps",
        "peak_kv_bytes",
        "peak_cuda_bytes",
        "attention_fraction",
        "speedup",
        "kv_reduction",
    ]
    print(format_table(records, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
