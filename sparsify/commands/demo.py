"""`sparsify demo`: the trained world model continuing a held-out scene, dense and sparse.

By default the committed world model (`world/weights/`) is given the first chunk of a
held-out scene of the reference world (clean prefix frames) and continues it twice — with a
dense cache holding every frame (`runtime.EagerRunner`) and on the paged runtime with the
world's default `PersistentLocal` pattern and its learned scorer. It writes:

* a table: seconds, peak KV-cache bytes, and the error against the scene's true
  continuation (mse, PSNR) of dense, sparse and the copy-the-last-frame floor;
* `rollout.gif`: labelled panels ground truth | dense | sparse with a frame counter;
* `block_mask.png`: which pages a middle layer's head 0 kept in the last chunk, chosen by
  the trained model's real scores (persistent | history | chunk).

On a 2-core CPU it finishes in about a minute. `--preset NAME` runs the earlier demo on
seeded random weights instead: the same noise and text context rolled out with
Self-Forcing's dense cache and through `sparsify(model, default PersistentLocal)`, the
relative difference of their latents, and channels 0–2 of both side by side (`tiny` runs on
a CPU in well under a minute; `wan2.1-1.3b` on a GPU is the real-size comparison).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from patterns import plot_block_mask
from patterns.files import atomic_path
from runtime import (
    CausalWanModel,
    EagerRunner,
    GlobalCache,
    WanConfig,
    generate,
    reference_runner,
    self_forcing_cache,
)
from runtime.block_map import BlockMap, block_map
from runtime.model_config import PRESETS
from sparsify.api import sparsify
from sparsify.commands.args import nonneg_int, out_dir, positive_int, torch_device
from sparsify.commands.cost import check_cpu_run
from sparsify.defaults import default_geometry, default_pattern, example_chunk
from sparsify.tables import format_table
from world import frames_to_latents, heldout_seeds, latents_to_frames, render, write_panels_gif
from world.quality import PREFIX_FRAMES, contenders, score_continuation, world_geometry
from world.scorers import load_world_scorer
from world.weights import load_world_model

PANEL_GAP = 4  # pixels between the dense and the sparse panel
CPU_NOTE = (
    "note: on a CPU the sparse rollout is slower than the dense one. Its kernel here is the\n"
    "torch backend, which gathers each query block's visible pages into dense tensors, and\n"
    "it selects pages and updates the persistent memory every chunk; at this model's size\n"
    "that bookkeeping costs more than the attention it skips. The speed-up is a GPU result:\n"
    "generated Triton kernels at Wan size (BENCHMARKS.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a random-weight model of this size instead of the trained world model",
    )
    parser.add_argument(
        "--chunks", type=positive_int, default=6, help="chunks of 3 latent frames to generate"
    )
    parser.add_argument(
        "--out", type=out_dir, default="sparsify-demo", help="folder for the PNG and the GIF"
    )
    parser.add_argument(
        "--seed",
        type=nonneg_int,
        default=0,
        help="noise seed; which held-out scene (world) or the weights and context (--preset)",
    )
    parser.add_argument(
        "--device", type=torch_device, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    parser.add_argument(
        "--force", action="store_true", help="run even if it takes hours (a large preset on a CPU)"
    )


def _stage(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _timed_rollout(
    runner, context: Tensor, config: WanConfig, chunks: int, seed: int, prefix: Tensor | None = None
):
    sync = torch.cuda.synchronize if context.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    latents = generate(
        runner,
        context,
        chunks,
        latent_shape=(config.in_channels, config.latent_height, config.latent_width),
        seed=seed,
        prefix=prefix,
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
    last_start = (chunks - 1) * frames_per_chunk
    graphs = sparse_module.cuda_graphs

    def eager_last_chunk(module, args, kwargs):
        start = kwargs["start_frame"] if "start_frame" in kwargs else args[3]
        module.cuda_graphs = graphs and start != last_start

    sparse_module.register_forward_pre_hook(eager_last_chunk, with_kwargs=True)
    return _state_map(sparse_module.runtime, 0, last_start)


def run(args: argparse.Namespace) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset is None:
        return world_demo(args, device)
    return preset_demo(args, device)


def preset_demo(args: argparse.Namespace, device: torch.device) -> int:
    """The random-weight demo: dense vs `sparsify` on the same noise (see the docstring)."""
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


def _state_map(runtime, layer: int, chunk_start: int) -> dict[str, BlockMap]:
    """Records `layer`'s block map in the first pass of the chunk at `chunk_start` (a
    pre-hook: the table the pattern builds from the real scores, no effect on results)."""
    found: dict[str, BlockMap] = {}

    def hook(module, args):
        if runtime.committed_frames == chunk_start and "map" not in found:
            found["map"] = block_map(module, args[0])

    runtime.states[layer].register_forward_pre_hook(hook)
    return found


def world_demo(args: argparse.Namespace, device: torch.device) -> int:
    """The trained world model continuing a held-out scene (see the module docstring)."""
    if device.type == "cpu":
        # Every core: this model's attention (768 queries over up to 5k keys) gains from
        # threads, unlike the tiny preset's shapes.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = load_world_model(device=device)
    config = model.config
    geometry = world_geometry(model)
    # The world's default budget, as the quality benchmark judges it.
    pattern = next(
        c.pattern for c in contenders(geometry, learned=True) if c.name == "persistent_local"
    )
    frames = args.chunks * config.frames_per_chunk
    scene_seed = heldout_seeds(args.seed + 1)[args.seed]
    _stage(
        f"world model on {device}: held-out scene {scene_seed}, {PREFIX_FRAMES} clean frames, "
        f"then {frames} generated"
    )
    scene = render([scene_seed], PREFIX_FRAMES + frames, device=device)
    prefix = frames_to_latents(scene.frames)[:, :, :PREFIX_FRAMES]
    context = torch.zeros(1, config.text_len, config.text_dim, device=device)

    dense = EagerRunner(model, GlobalCache())
    # No CUDA graphs: a replayed graph runs no hooks, and the block map needs one.
    sparse = reference_runner(
        model, pattern, page_size=geometry.page_size, q_block=geometry.q_block, cuda_graphs=False
    )
    load_world_scorer(sparse.runtime)
    layer = config.num_layers // 2
    last_start = PREFIX_FRAMES + frames - config.frames_per_chunk
    recorded = _state_map(sparse.runtime, layer, last_start)

    _stage("dense rollout, then the sparse one")
    results = {}
    for name, runner in (("dense", dense), ("sparse", sparse)):
        latents, seconds = _timed_rollout(runner, context, config, args.chunks, args.seed, prefix)
        video = latents_to_frames(latents.float()).clamp(-1, 1)  # prefix included
        results[name] = (video, seconds, runner.peak_kv_bytes)
    last = scene.frames[:, PREFIX_FRAMES - 1 : PREFIX_FRAMES].expand(-1, frames, -1, -1, -1)
    scored = {"copy_last": score_continuation(last, scene, [frames])[frames]}
    for name, (video, _, _) in results.items():
        scored[name] = score_continuation(video[:, PREFIX_FRAMES:], scene, [frames])[frames]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    mask_path, gif_path = out / "block_mask.png", out / "rollout.gif"
    bmap = recorded["map"]
    columns = bmap.column_frame.tolist()
    plot_block_mask(
        bmap.visible[0, 0],
        mask_path,
        title=f"world model, layer {layer}, head 0, chunk at frame {bmap.chunk_start}: "
        f"{sum(f < 0 for f in columns)} persistent pages | frames "
        f"{min(f for f in columns if f >= 0)}–{max(columns)}",
    )
    sparse_label = f"sparse ({type(pattern).__name__})"
    write_panels_gif(
        gif_path,
        {
            "ground truth": scene.frames[0],
            "dense": results["dense"][0][0],
            sparse_label: results["sparse"][0][0],
        },
        fps=6,
        prefix_frames=PREFIX_FRAMES,
    )

    dense_kv = results["dense"][2]
    rows = [
        {
            "rollout": label,
            "seconds": results[name][1] if name in results else None,
            "peak KV": _mib(results[name][2]) if name in results else None,
            "KV vs dense": results[name][2] / dense_kv if name in results else None,
            "mse": scored[name]["mse"],
            "psnr dB": scored[name]["psnr"],
        }
        for name, label in (
            ("dense", "dense (cache of every frame)"),
            ("sparse", sparse_label),
            ("copy_last", "copy the last prefix frame (floor)"),
        )
    ]
    print(
        f"\nworld model: held-out scene {scene_seed}, {frames} frames after {PREFIX_FRAMES} "
        f"clean ones, on {device}; pattern {pattern}; error against the true continuation"
    )
    print(format_table(rows, list(rows[0])))
    if device.type == "cpu":
        print(CPU_NOTE)
    print(f"\nwrote {mask_path} and {gif_path}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
