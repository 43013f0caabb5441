"""Rollout benchmark (BENCHMARKS.md): dense Self-Forcing vs `sparsify` on the reference model.

    python -m bench.rollout --json out.json [--preset wan2.1-1.3b] [--horizons 5s,20s,60s]

The `wan2.1-1.3b` reference model with seeded random weights in bf16, B=1, a random text
context of 512 x 4096, chunks of 3 latent frames, 4 denoising passes + 1 context pass each.
Implementations, each timed over the whole rollout of a horizon in one process:

* `dense`         — the model's own SDPA attention with the eager Self-Forcing cache (global up
                    to 21 frames, then a rolling 21-frame window without sink);
* `sparse`        — `sparsify(model, default PersistentLocal)`;
* `sparse_dense`  — `sparsify(model, Dense(...))` with the dense baseline's window: what the
                    rewrite itself costs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import device_record, format_table, write_json
from patterns import Dense
from runtime import CausalWanModel, EagerRunner, WanConfig, generate, self_forcing_cache
from runtime.eager import SELF_FORCING_WINDOW_FRAMES
from runtime.rollout import ChunkRunner
from sparsify import sparsify
from sparsify.defaults import default_geometry, default_pattern, example_chunk


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


HORIZONS = {h.name: h for h in (Horizon("5s", 7), Horizon("20s", 27), Horizon("60s", 80))}


def dense_pattern(horizon: Horizon) -> Dense:
    """`Dense` with the baseline's cache policy (`runtime.self_forcing_cache`)."""
    if horizon.latent_frames <= SELF_FORCING_WINDOW_FRAMES:
        return Dense()
    return Dense(window_frames=SELF_FORCING_WINDOW_FRAMES)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_rollout(runner: ChunkRunner, config: WanConfig, context, chunks: int) -> dict:
    """Time one whole rollout; memory peaks are measured from a reset allocator."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    generate(
        runner, context, chunks,
        latent_shape=(config.in_channels, config.latent_height, config.latent_width),
        seed=0, progress=True,
    )
    _sync()
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        seconds_per_chunk=seconds / chunks,
        peak_kv_bytes=int(runner.peak_kv_bytes),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    )


ATTENTION_KERNELS = ("flash", "fmha", "attention", "pbsa", "cudnn", "sdpa", "flex")


def attention_fraction(runner: ChunkRunner, config: WanConfig, context) -> float | None:
    """Share of GPU kernel time spent in self-attention kernels during a one-chunk rollout,
    from the profiler's kernel names (cross-attention kernels are excluded by their much
    shorter key length only if they are named differently; both run through SDPA here, so
    the cross-attention share, ~1 % at 512 text tokens, is counted in)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_rollout(runner, config, context, 1)
    total = attention = 0.0
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernel_time = getattr(event, "device_time_total", None)
        if kernel_time is None:  # torch < 2.4 spelling
            kernel_time = event.cuda_time_total
        total += kernel_time
        if any(name in event.key.lower() for name in ATTENTION_KERNELS):
            attention += kernel_time
    return attention / total if total else None


def build_runners(
    model: CausalWanModel, horizon: Horizon, context, impls: list[str]
) -> dict[str, Callable[[], ChunkRunner]]:
    config = model.config
    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    example = example_chunk(config, context)
    makers = {
        "dense": lambda: EagerRunner(model, self_forcing_cache(horizon.latent_frames)),
        "sparse": lambda: sparsify(model, example, default_pattern(geometry), geometry=geometry),
        "sparse_dense": lambda: sparsify(model, example, dense_pattern(horizon), geometry=geometry),
    }
    return {name: makers[name] for name in impls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--horizons", default="5s,20s,60s")
    parser.add_argument("--impls", default="dense,sparse,sparse_dense")
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = WanConfig.preset(args.preset)
    model = CausalWanModel(config).to(device, dtype).eval()
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    impls = args.impls.split(",")

    records = []
    for name in args.horizons.split(","):
        horizon = HORIZONS[name]
        runners = build_runners(model, horizon, context, impls)
        for impl, make in runners.items():
            runner = make()
            run_rollout(runner, config, context, 1)  # warm-up: compile, autotune, caches
            record = dict(horizon=name, impl=impl, chunks=horizon.chunks)
            record.update(run_rollout(runner, config, context, horizon.chunks))
            record["fps"] = horizon.pixel_frames / record["seconds"]
            record["attention_fraction"] = attention_fraction(runner, config, context)
            records.append(record)
            print(f"{name} {impl}: {record['seconds']:.2f} s", flush=True)
            del runner
            if device == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in records if r["horizon"] == name and r["impl"] == "dense"), None)
        for r in records:
            if base and r["horizon"] == name:
                r["speedup"] = base["seconds"] / r["seconds"]
                r["kv_reduction"] = 1.0 - r["peak_kv_bytes"] / base["peak_kv_bytes"]

    write_json(args.json, dict(device=device_record(), preset=args.preset, records=records))
    columns = ["horizon", "impl", "seconds", "seconds_per_chunk", "fps", "peak_kv_bytes",
               "peak_cuda_bytes", "attention_fraction", "speedup", "kv_reduction"]
    print(format_table(records, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
