"""`sparsify generate`: a prompt to an MP4 with a real causal Wan checkpoint.

The checkpoint (Self-Forcing, CausVid, LongLive base + `--lora`, Wan2.1 or diffusers; see
`runtime.load_causal_wan`) runs the Self-Forcing rollout, densely (`--dense`, Self-Forcing's
KV cache) or through `sparsify` with a pattern; the prompt is encoded and the latents decoded
by the UMT5 text encoder and VAE of a local Wan2.1 diffusers folder (`--wan-dir`, e.g. a
download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers). A missing file or package is one line and
exit code 2. Without a GPU it runs on the CPU (only practical for tiny models).

``--parallel heads`` under ``torchrun --nproc-per-node N`` splits the heads over N processes
(GPUs): each holds its heads' KV cache (dense or sparse alike, `runtime.parallel`); rank 0
decodes and writes the MP4.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HELP = "prompt → MP4 with a Self-Forcing / CausVid / LongLive / Wan checkpoint (dense or sparse)"

PATTERNS = ("persistent-local", "sink-window", "topk", "dense")
WAN_PACKAGES = ("diffusers", "transformers", "imageio_ffmpeg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or model folder")
    parser.add_argument(
        "--wan-dir", required=True, help="Wan2.1 diffusers folder (vae/, text_encoder/, tokenizer/)"
    )
    parser.add_argument("--prompt", required=True, help="what the video shows")
    parser.add_argument("--seconds", type=float, default=5.0, help="video length at 16 fps")
    parser.add_argument(
        "--pattern", choices=PATTERNS, default="persistent-local", help="sparse attention pattern"
    )
    parser.add_argument("--dense", action="store_true", help="dense Self-Forcing KV cache instead")
    parser.add_argument("--out", default="video.mp4", help="MP4 to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--height", type=int, default=480, help="video height in pixels")
    parser.add_argument("--width", type=int, default=832, help="video width in pixels")
    parser.add_argument("--lora", default=None, help="LoRA file or PEFT folder (LongLive)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: r)")
    parser.add_argument("--no-ema", action="store_true", help="use 'generator', not the EMA")
    parser.add_argument(
        "--parallel",
        choices=("heads",),
        default=None,
        help="under torchrun --nproc-per-node N: each of N ranks holds 1/N of the heads",
    )


def _fail(message: str) -> int:
    print(f"sparsify generate: {message}", file=sys.stderr)
    return 2


def _pattern(name: str, geometry):
    from patterns import Dense, SinkWindow, TopK
    from sparsify.defaults import default_pattern

    frames = geometry.frames_per_chunk
    return {
        "persistent-local": lambda: default_pattern(geometry),
        # LongLive's frame sink (one chunk) with a 12-frame local window.
        "sink-window": lambda: SinkWindow(sink_frames=frames, window_frames=4 * frames),
        "topk": lambda: TopK(),
        "dense": lambda: Dense(),
    }[name]()


def _runner(model, context, args, num_frames: int):
    from runtime import EagerRunner, HeadParallelEagerRunner, self_forcing_cache
    from sparsify.api import sparsify
    from sparsify.commands.distributed import is_main_rank
    from sparsify.defaults import default_geometry, example_chunk

    if args.dense:
        cache = self_forcing_cache(num_frames)
        if args.parallel:
            return HeadParallelEagerRunner(model, cache)
        return EagerRunner(model, cache)
    cfg = model.config
    geometry = default_geometry(cfg.tokens_per_frame, cfg.frames_per_chunk)
    module = sparsify(
        model,
        example_chunk(cfg, context),
        _pattern(args.pattern, geometry),
        geometry,
        parallel=args.parallel,
    )
    if is_main_rank():
        print(module.plan)
    return module


def _check_arguments(args: argparse.Namespace) -> str | None:
    if not args.seconds > 0:
        return f"--seconds must be positive, got {args.seconds}"
    if not Path(args.checkpoint).expanduser().exists():
        return f"missing the checkpoint: {Path(args.checkpoint).expanduser()} does not exist"
    if args.lora is not None and not Path(args.lora).expanduser().exists():
        return f"missing the LoRA: {Path(args.lora).expanduser()} does not exist"
    missing = [name for name in WAN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs the Python packages {', '.join(missing)} (pip install 'sparse-forcing[wan]')"
    from runtime.wan_assets import missing_wan_file

    return missing_wan_file(args.wan_dir)


def run(args: argparse.Namespace) -> int:
    problem = _check_arguments(args)
    if problem:
        return _fail(problem)
    import torch

    from runtime import CheckpointError, generate, load_causal_wan
    from runtime.pixels import num_chunks_for, video_from_context
    from runtime.wan_assets import encode_prompt, load_wan_assets, read_vae_config, vae_factors
    from sparsify.commands.distributed import is_main_rank, join_torchrun

    if args.parallel:
        try:
            device = join_torchrun(args.device)
        except RuntimeError as exc:
            return _fail(str(exc))
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        factor = vae_factors(read_vae_config(args.wan_dir))[0]
    except FileNotFoundError as exc:
        return _fail(str(exc))
    if args.height % (2 * factor) or args.width % (2 * factor):
        return _fail(f"--height and --width must be multiples of {2 * factor} (VAE x patch)")
    latent = {"latent_height": args.height // factor, "latent_width": args.width // factor}
    try:  # the checkpoint first: a broken one fails before the text encoder is read
        model = load_causal_wan(
            args.checkpoint,
            latent,
            ema=not args.no_ema,
            device=device,
            dtype=dtype,
            lora=args.lora,
            lora_alpha=args.lora_alpha,
        )
    except CheckpointError as exc:
        return _fail(str(exc))
    assets = load_wan_assets(args.wan_dir, device, dtype)
    cfg = model.config
    num_frames = num_chunks_for(args.seconds, assets.temporal_factor) * cfg.frames_per_chunk
    try:
        context = encode_prompt(assets, args.prompt, cfg.text_len, cfg.text_dim)
    except ValueError as exc:
        return _fail(str(exc))
    context = context.to(device, dtype)
    if args.parallel:
        import torch.distributed as dist

        from runtime.distributed import check_head_split

        try:
            check_head_split(cfg.num_heads, cfg.num_kv_heads, dist.get_world_size())
        except ValueError as exc:
            return _fail(f"--parallel heads: {exc}")
    runner = _runner(model, context, args, num_frames)
    if not is_main_rank():  # the same rollout as rank 0, whose latents it decodes
        shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
        chunks = num_frames // cfg.frames_per_chunk
        generate(runner, context, chunks, latent_shape=shape, seed=args.seed, progress=False)
        return 0
    frames = video_from_context(
        runner, model, assets, context, args.out, seconds=args.seconds, seed=args.seed
    )
    mode = "dense" if args.dense else args.pattern
    print(f"wrote {args.out}: {frames} frames at {args.width}x{args.height}, {mode} attention")
    return 0
