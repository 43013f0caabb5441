"""`sparsify demo`: the reference model's dense autoregressive rollout, timed.

Runs `runtime.generate` with an `EagerRunner` (Self-Forcing's dense KV cache) on a seeded
random text context and prints one table row: chunks, frames, seconds and KV-cache bytes.
"""

from __future__ import annotations

import argparse
import time

import torch

from runtime import CausalWanModel, EagerRunner, GlobalCache, RollingCache, WanConfig, generate
from runtime.model_config import PRESETS

HELP = "run the reference model's dense AR rollout and report time and KV-cache size"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--chunks", type=int, default=4, help="chunks to generate")
    parser.add_argument(
        "--window", type=int, default=0, help="rolling KV window in frames (0: global cache)"
    )
    parser.add_argument("--sink", type=int, default=0, help="sink frames of the rolling window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the context")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    if args.chunks <= 0:
        raise SystemExit(f"--chunks must be positive, got {args.chunks}")
    if args.window < 0 or args.sink < 0:
        raise SystemExit("--window and --sink must be >= 0")
    config = WanConfig.preset(args.preset)
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    model = CausalWanModel(config).to(device, dtype).eval()
    cache = GlobalCache() if args.window == 0 else RollingCache(args.window, args.sink)
    runner = EagerRunner(model, cache)
    generator = torch.Generator().manual_seed(args.seed)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)

    start = time.perf_counter()
    latents = generate(
        runner,
        context.to(device, dtype),
        args.chunks,
        latent_shape=(config.in_channels, config.latent_height, config.latent_width),
        seed=args.seed,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    rows = [
        ("preset", "cache", "chunks", "frames", "seconds", "KV peak", "KV held"),
        (
            args.preset,
            repr(cache),
            str(args.chunks),
            str(latents.shape[2]),
            f"{seconds:.2f}",
            _mib(runner.peak_kv_bytes),
            _mib(runner.current_kv_bytes),
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0
