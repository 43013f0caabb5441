"""Rollout benchmark (BENCHMARKS.md): dense Self-Forcing vs `sparsify` on the reference model.

    python -m bench.rollout --json out.json [--preset wan2.1-1.3b] [--horizons 5s,20s,60s]
        [--impls dense_compiled,dense,sparse,sparse_dense] [--rounds 2] [--long-rounds 1]
    python -m bench.rollout --merge a.json b.json --json all.json   (runs of several commands)

The `wan2.1-1.3b` reference model with seeded random weights in bf16, B=1, a random text
context of 512 x 4096, chunks of 3 latent frames, 4 denoising passes + 1 context pass each.
Implementations, each timed over the whole rollout of a horizon in one process:

* `dense_compiled` — the headline denominator: `runtime.CompiledDenseRunner`, the same
                    Self-Forcing cache in fixed buffers, blocks under torch.compile, cuDNN SDPA
                    (`--sdpa-backend`; `fa4`: FlashAttention-4's forward where flash-attn-4
                    is installed), every pass replayed from a CUDA graph;
* `dense`         — the model's own SDPA attention with the eager Self-Forcing cache (global up
                    to 21 frames, then a rolling 21-frame window without sink);
* `sparse`        — `sparsify(model, default PersistentLocal)`, its graph compiled and its
                    passes replayed as CUDA graphs (`--no-compile`, `--no-cuda-graphs` to
                    turn either off, for every compiled runner);
* `sparse_dense`  — `sparsify(model, Dense(...))` with the dense baseline's window, compiled
                    and graphed alike: what the runtime costs without sparsity.

Per horizon: one warm-up rollout per runner, then `--rounds` timed rounds (`--long-rounds` at
60 s) with the runners in an order rotated every round; `seconds` is the best round
(`seconds_median`, `rounds` beside it). Ratios (`speedup_vs_*`, `kv_reduction_vs_*`) are
against `dense_compiled` and `dense` of the same horizon and run; `rel_diff_vs_dense` is
‖video − dense's‖ / ‖dense's‖. `fps` counts pixel frames (4·latent − 3) of the denoising loop
alone (no VAE decoding, no text encoder).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import cuda_kernels, device_record, device_time_us, sync, write_json
from patterns import Dense
from runtime import CausalWanModel, EagerRunner, WanConfig, generate, self_forcing_cache
from runtime.compiled_dense import SDPA_BACKENDS, CompiledDenseRunner
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
    """Time one whole rollout; memory peaks are measured from a reset allocator. The video
    comes back under "video" (for the relative difference to dense)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # No cyclic-GC pauses inside the timed region, for every runner alike.
    gc.collect()
    gc.disable()
    try:
        sync()
        start = time.perf_counter()
        video = generate(
            runner,
            context,
            chunks,
            latent_shape=(config.in_channels, config.latent_height, config.latent_width),
            seed=0,
            progress=False,
        )
        sync()
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return dict(
        seconds=seconds,
        peak_kv_bytes=int(runner.peak_kv_bytes),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        video=video,
    )


def self_attention_modules(runner) -> list[torch.nn.Module]:
    """The modules that compute self-attention in a runner: the reference model's attention
    spellings for the eager baseline, the runtime's per-layer states for `sparsify`'s."""
    if isinstance(runner, EagerRunner):
        return [block.self_attn.attn for block in runner.model.blocks]
    if isinstance(runner, CompiledDenseRunner):
        return runner.self_attention_modules()
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
    total = sum(device_time_us(e) for e in cuda_kernels(prof))
    attention = sum(device_time_us(e) for e in prof.key_averages() if e.key == SELF_ATTENTION_RANGE)
    return attention / total if total else None


IMPLS = ("dense_compiled", "dense", "sparse", "sparse_dense")
# what speed-ups and KV reductions are relative to, in this order (the headline first)
BASELINES = ("dense_compiled", "dense")
SHORT = ("5s", "20s")  # horizons repeated `--rounds` times (the long one `--long-rounds`)


def _rel_diff(video, reference) -> float:
    a, b = video.float(), reference.float()
    return float((a - b).norm() / b.norm())


def _relate(records: list[dict]) -> None:
    """speedup_vs_X / kv_reduction_vs_X for every baseline X measured at the same horizon of
    this run (ratios are only meaningful within one process)."""
    for record in records:
        for base in BASELINES:
            ref = next(
                (r for r in records if r["horizon"] == record["horizon"] and r["impl"] == base),
                None,
            )
            if ref is not None:
                record[f"speedup_vs_{base}"] = ref["seconds"] / record["seconds"]
                record[f"kv_reduction_vs_{base}"] = (
                    1.0 - record["peak_kv_bytes"] / ref["peak_kv_bytes"]
                )


def _merge(paths: list[str]) -> dict:
    """Records of several runs (one per command), each tagged with its run's device record;
    the ratios stay those of its own run."""
    records, devices = [], []
    for i, path in enumerate(paths):
        payload = json.loads(Path(path).read_text())
        devices.append(payload["device"])
        records += [dict(r, run=i) for r in payload["records"]]
    return dict(device=devices[0], runs=devices, sources=paths, records=records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--horizons", default="5s,20s,60s")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"any of {','.join(IMPLS)}")
    parser.add_argument("--rounds", type=int, default=2, help=f"timed rounds at {SHORT}")
    parser.add_argument("--long-rounds", type=int, default=1, help="timed rounds at 60s")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--merge", nargs="+", default=None, help="merge these JSON files into --json and exit"
    )
    parser.add_argument(
        "--fraction-horizons",
        default=None,
        help="horizons whose attention fraction is profiled (default: all; '' for none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="compiled runners uncompiled")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="graphed runners eager")
    parser.add_argument(
        "--sdpa-backend",
        default="cudnn",
        choices=SDPA_BACKENDS,
        help="dense_compiled's attention: an SDPA backend, or fa4 (flash-attn-4, if installed)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        payload = _merge(args.merge)
        write_json(args.json, payload)
        print(format_table(payload["records"], ["run", *COLUMNS]))
        return 0
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; expected some of {IMPLS}")
    horizons = args.horizons.split(",")
    unknown = [h for h in horizons if h not in HORIZONS]
    if unknown:
        parser.error(f"--horizons: unknown {unknown}; expected some of {list(HORIZONS)}")
    fractions = horizons if args.fraction_horizons is None else args.fraction_horizons.split(",")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = WanConfig.preset(args.preset)
    print(f"set-up: building {args.preset} on {device}, random weights", flush=True)
    model = CausalWanModel(config).to(device, dtype).eval()
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)

    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    example = example_chunk(config, context)
    # Built once and reset per rollout: compiled code and CUDA graphs serve every horizon.
    patterns = {
        "sparse": default_pattern(geometry),
        # the dense baseline's cache policy on the sparse runtime: what the rewrite costs
        "sparse_dense": Dense(window_frames=SELF_FORCING_WINDOW_FRAMES),
    }
    rewritten = ", ".join(impl for impl in impls if impl in patterns)
    print(f"set-up: capturing and rewriting the graph for {rewritten}", flush=True)
    runners: dict[str, ChunkRunner] = {
        impl: sparsify(
            model, example, patterns[impl], geometry=geometry, cuda_graphs=not args.no_cuda_graphs
        )
        for impl in impls
        if impl in patterns
    }
    if not args.no_compile:
        for runner in runners.values():
            runner.compile()
    if "dense_compiled" in impls:
        # Self-Forcing's cache: global up to 21 frames, then the rolling 21-frame window
        runners["dense_compiled"] = CompiledDenseRunner(
            model,
            compile=not args.no_compile,
            cuda_graphs=not args.no_cuda_graphs,
            sdpa_backend=args.sdpa_backend,
        )

    card = device_record()
    records: list[dict] = []
    for name in horizons:
        horizon = HORIZONS[name]
        rounds = args.rounds if name in SHORT else args.long_rounds

        dense = EagerRunner(model, self_forcing_cache(horizon.latent_frames))
        by_impl = {impl: dense if impl == "dense" else runners.get(impl) for impl in impls}

        # Warm-up over every KV length the timed runs meet (compiling, CUDA-graph captures,
        # cuDNN plans): the cold cost shows here, not in the rounds.
        warmups = {}
        for impl in impls:
            print(f"{name} {impl}: warm-up rollout", flush=True)
            warm = run_rollout(by_impl[impl], config, context, min(horizon.chunks, WARMUP_CHUNKS))
            warmups[impl] = warm["seconds"]
        timed: dict[str, list[dict]] = {impl: [] for impl in impls}
        videos = {}  # each runner's first video (rollouts are seeded: every round's is alike)
        for r in range(rounds):
            # rotate the order every round so that clock drift favours no runner
            order = impls[r % len(impls) :] + impls[: r % len(impls)]
            for impl in order:
                result = run_rollout(by_impl[impl], config, context, horizon.chunks)
                videos.setdefault(impl, result.pop("video"))
                result.pop("video", None)
                timed[impl].append(result)
                print(f"{name} {impl} round {r}: {result['seconds']:.3f} s", flush=True)
        for impl in impls:
            runs = timed[impl]
            best = min(runs, key=lambda run: run["seconds"])
            record = dict(
                horizon=name,
                impl=impl,
                chunks=horizon.chunks,
                rounds=[run["seconds"] for run in runs],
                seconds=best["seconds"],
                seconds_median=statistics.median(run["seconds"] for run in runs),
                seconds_per_chunk=best["seconds"] / horizon.chunks,
                fps=horizon.pixel_frames / best["seconds"],
                peak_kv_bytes=best["peak_kv_bytes"],
                peak_cuda_bytes=max((run["peak_cuda_bytes"] or 0) for run in runs) or None,
                warmup_seconds=warmups[impl],
            )
            if "dense" in videos:
                record["rel_diff_vs_dense"] = _rel_diff(videos[impl], videos["dense"])
            if impl == "dense_compiled":
                record["sdpa_backend"] = args.sdpa_backend
            if name in fractions:
                # a failed profile must not cost the timings already taken: its error is
                # recorded (and printed whole) in place of the fraction
                try:
                    record["attention_fraction"] = attention_fraction(
                        by_impl[impl], config, context, horizon
                    )
                except Exception as error:
                    traceback.print_exc()
                    record["attention_fraction_error"] = f"{type(error).__name__}: {error}"
            records.append(record)
        del videos
        _relate(records)
        for record in records[-len(impls) :]:
            print(record, flush=True)
        # after every horizon, so that a run cut short keeps what it measured
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

    print(format_table(records, COLUMNS))
    return 0


COLUMNS = [
    "horizon",
    "impl",
    "seconds",
    "seconds_median",
    "fps",
    "peak_kv_bytes",
    "peak_cuda_bytes",
    "attention_fraction",
    "rel_diff_vs_dense",
    "speedup_vs_dense_compiled",
    "speedup_vs_dense",
    "kv_reduction_vs_dense_compiled",
]


if __name__ == "__main__":
    raise SystemExit(main())
