"""`sparsify demo`: dense and Sparse Forcing rollouts of the reference model, side by side.

Rolls out the same seeded noise and text context twice — with Self-Forcing's dense KV cache
(`runtime.EagerRunner`) and through `sparsify(model, default PersistentLocal)` — and writes:

* a table: seconds, peak KV-cache bytes, and the relative difference of the latents;
* `block_mask.png`: what layer 0, head 0 sees in the last chunk (persistent | history | chunk);
* `rollout.gif`: the latent frames (channels 0–2 as RGB) of both rollouts side by side.

On the embedded default (`tiny`) it runs on a CPU in well under a minute; `--preset
wan2.1-1.3b` on a GPU is the real-size comparison.
"""

from __future__ import annotations

import argparse
import sys
import time

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from patterns import plot_block_mask
from patterns.files import atomic_path
from runtime import CausalWanModel, EagerRunner, WanConfig, generate, self_forcing_cache
from runtime.block_map import BlockMap, block_map
from runtime.model_config import PRESETS
from sparsify.api import sparsify
from sparsify.commands.args import out_dir, positive_int, torch_device
from sparsify.commands.cost import check_cpu_run
from sparsify.defaults import default_geometry, default_pattern, example_chunk

PANEL_GAP = 4  # pixels between the dense and the sparse panel
CPU_NOTE = (
    "note: on a CPU the sparse rollout is slower than the dense one. Its kernel here is the\n"
    "torch backend, which gathers each query block's visible pages into dense tensors, and\n"
    "it selects pages and updates the persistent memory every chunk; at this model's size\n"
    "that bookkeeping costs more than the attention it skips. The speed-up is a GPU result:\n"
    "generated Triton kernels at Wan size (BENCHMARKS.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--chunks", type=positive_int, default=6, help="chunks of 3 latent frames")
    parser.add_argument(
        "--out", type=out_dir, default="sparsify-demo", help="folder for the PNG and the GIF"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, noise and context")
    parser.add_argument(
        "--device", type=torch_device, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    parser.add_argument(
        "--force", action="store_true", help="run even if it takes hours (a large preset on a CPU)"
    )


def _stage(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _timed_rollout(runner, context: Tensor, config: WanConfig, chunks: int, seed: int):
    sync = torch.cuda.synchronize if context.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    latents = generate(
        runner,
        context,
        chunks,
        latent_shape=(config.in_channels, config.latent_height, config.latent_width),
        seed=seed,
    )
    sync()
    return latents, time.perf_counter() - start


def _to_rgb(latents: Tensor, low: Tensor, high: Tensor) -> np.ndarray:
    """Latents [C, F, H, W] → uint8 frames [F, H, W, 3] (channels 0–2, shared range)."""
    rgb = latents[:3].float().cpu()
    if rgb.shape[0] < 3:  # fewer than three channels: grey
        rgb = rgb[:1].expand(3, -1, -1, -1)
    rgb = ((rgb - low) / (high - low)).clamp(0, 1)
    return (rgb.permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)


def side_by_side(dense: Tensor, sparse: Tensor, height: int = 256) -> np.ndarray:
    """Frames [F, H', 2W'+gap, 3] with the dense rollout left and the sparse one right, both
    on the dense rollout's value range so a difference in colour is a difference in value."""
    ref = dense[:3].float().cpu().flatten(1)
    low = ref.quantile(0.02, dim=1)[:, None, None, None]
    high = ref.quantile(0.98, dim=1)[:, None, None, None] + 1e-6
    if low.shape[0] < 3:
        low, high = low[:1].expand(3, -1, -1, -1), high[:1].expand(3, -1, -1, -1)
    scale = max(1, height // dense.shape[-2])
    panels = [
        _to_rgb(x, low, high).repeat(scale, axis=1).repeat(scale, axis=2) for x in (dense, sparse)
    ]
    gap = np.full((*panels[0].shape[:2], PANEL_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=2)


def _last_chunk_map(sparse_module, chunks: int, frames_per_chunk: int) -> dict[str, BlockMap]:
    """Records layer 0's block map during the last chunk (a pre-hook; no effect on results).
    The last chunk's passes run eagerly: a replayed CUDA graph runs no hooks."""
    runtime = sparse_module.runtime
    state = runtime.states[0]
    last_start = (chunks - 1) * frames_per_chunk
    found: dict[str, BlockMap] = {}
    graphs = sparse_module.cuda_graphs

    def eager_last_chunk(module, args, kwargs):
        start = kwargs["start_frame"] if "start_frame" in kwargs else args[3]
        module.cuda_graphs = graphs and start != last_start

    def hook(module, args):
        if runtime.committed_frames == last_start and "map" not in found:
            found["map"] = block_map(module, args[0])

    sparse_module.register_forward_pre_hook(eager_last_chunk, with_kwargs=True)
    state.register_forward_pre_hook(hook)
    return found


def run(args: argparse.Namespace) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = WanConfig.preset(args.preset, seed=args.seed)
    if device.type == "cpu":
        # Small CPU shapes: one thread is 3-25x faster than two that contend for the cores.
        torch.set_num_threads(1)
        what = f"{args.preset}, dense and sparse rollouts"
        _stage(
            check_cpu_run(
                config, 2 * args.chunks, what, force=args.force, flag="--preset",
                advice="use a GPU or fewer --chunks",
            )
        )  # fmt: skip
    _stage(f"building {args.preset} on {device} (seeded random weights)")
    model = CausalWanModel(config).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    context = context.to(device, dtype)
    geometry = default_geometry(config.tokens_per_frame, config.frames_per_chunk)
    pattern = default_pattern(geometry)
    _stage("capturing the graph and rewriting its self-attention")
    sparse = sparsify(model, example_chunk(config, context), pattern, geometry=geometry)
    print(sparse.plan)
    recorded = _last_chunk_map(sparse, args.chunks, config.frames_per_chunk)
    dense = EagerRunner(model, self_forcing_cache(args.chunks * config.frames_per_chunk))

    _stage("dense rollout, then the sparse one")
    dense_latents, dense_s = _timed_rollout(dense, context, config, args.chunks, args.seed)
    sparse_latents, sparse_s = _timed_rollout(sparse, context, config, args.chunks, args.seed)
    diff = float(
        (sparse_latents.float() - dense_latents.float()).norm() / dense_latents.float().norm()
    )

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    mask_path, gif_path = out / "block_mask.png", out / "rollout.gif"
    bmap = recorded["map"]
    frames = bmap.column_frame.tolist()
    persistent = sum(f < 0 for f in frames)
    plot_block_mask(
        bmap.visible[0, 0],
        mask_path,
        title=f"layer 0, head 0, chunk at frame {bmap.chunk_start}: {persistent} persistent "
        f"pages | frames {min(f for f in frames if f >= 0)}–{max(frames)}",
    )
    with atomic_path(gif_path) as tmp:
        iio.imwrite(tmp, side_by_side(dense_latents[0], sparse_latents[0]), duration=250, loop=0)

    rows = [
        ("rollout", "seconds", "peak KV", "KV vs dense", "rel. diff"),
        ("dense (Self-Forcing cache)", f"{dense_s:.2f}", _mib(dense.peak_kv_bytes), "1.00", "0"),
        (
            f"sparse ({type(pattern).__name__})",
            f"{sparse_s:.2f}",
            _mib(sparse.peak_kv_bytes),
            f"{sparse.peak_kv_bytes / dense.peak_kv_bytes:.2f}",
            f"{diff:.3f}",
        ),
    ]
    print(
        f"\n{args.preset}: {args.chunks} chunks ({args.chunks * config.frames_per_chunk} "
        f"latent frames) on {device}; pattern {pattern}"
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if device.type == "cpu":
        print(CPU_NOTE)
    print(f"\nwrote {mask_path} and {gif_path}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
