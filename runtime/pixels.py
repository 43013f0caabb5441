"""From a prompt to an MP4: encode, roll out, decode chunk by chunk, write.

Decoding streams: Wan's VAE is causal in time (each latent frame's decode reads a cache of
the previous ones), so the latents are decoded one latent frame at a time with that cache
kept, each piece is moved to the CPU as uint8 and handed to the video writer at once. A long
video never holds its decoded pixels on the GPU (nor, as floats, anywhere).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from runtime.model import CausalWanModel
from runtime.rollout import ChunkRunner, SelfForcingSchedule, generate
from runtime.wan_assets import WanAssets

WAN_FPS = 16


def num_chunks_for(seconds: float, temporal_factor: int = 4, fps: int = WAN_FPS) -> int:
    """Chunks of 3 latent frames whose decoded video (1 + temporal_factor·(F − 1) frames)
    lasts at least `seconds` at `fps` (5 s → 21 latent frames → 81 frames, as Self-Forcing)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    frames_per_chunk = SelfForcingSchedule().frames_per_chunk
    latent_frames = math.ceil((math.ceil(seconds * fps) - 1) / temporal_factor) + 1
    return max(1, math.ceil(latent_frames / frames_per_chunk))


def _to_uint8(video: Tensor) -> np.ndarray:
    """VAE output [1, 3, T, H, W] in [-1, 1] → frames [T, H, W, 3] uint8 on the CPU."""
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def decode_frames(vae, latents: Tensor, progress: bool = True) -> Iterator[np.ndarray]:
    """Decode normalised latents [1, C, F, h, w] (the DiT's space) piece by piece: yields
    uint8 frames [T_i, H, W, 3], T_0 = 1 then `temporal_factor` per latent frame.

    Latents are de-normalised with the VAE config's `latents_mean`/`latents_std` (x·std +
    mean, as diffusers' WanPipeline does). The loop is `AutoencoderKLWan._decode`'s with its
    feature cache kept between latent frames; the tests check it against `vae.decode`.
    """
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be [1, C, F, h, w], got {tuple(latents.shape)}")
    config = vae.config
    if latents.shape[1] != config.z_dim:
        raise ValueError(
            f"latents have {latents.shape[1]} channels, the VAE's z_dim is {config.z_dim}"
        )
    if getattr(config, "patch_size", None) is not None or not hasattr(vae, "clear_cache"):
        raise ValueError("decode_frames supports the Wan2.1 AutoencoderKLWan (no patch_size)")
    param = next(vae.parameters())
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=param.device).view(shape)
    std = torch.tensor(config.latents_std, device=param.device).view(shape)
    z = latents.to(param.device, param.dtype) * std.to(param.dtype) + mean.to(param.dtype)
    vae.clear_cache()
    try:
        for i in tqdm(range(z.shape[2]), desc="decode", unit="latent frame", disable=not progress):
            vae._conv_idx = [0]
            x = vae.post_quant_conv(z[:, :, i : i + 1])  # a 1x1x1 conv: frame by frame is exact
            kwargs = {"first_chunk": True} if i == 0 else {}
            out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs)
            yield _to_uint8(out)
    finally:
        vae.clear_cache()


def write_mp4(path: str | Path, frames: Iterator[np.ndarray], fps: int = WAN_FPS) -> int:
    """Stream uint8 frame batches [T, H, W, 3] into an H.264 MP4 at `path`; returns the frame
    count. Written to a temporary file, read back and checked, then renamed into place."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    count = 0
    try:
        writer = imageio.get_writer(
            tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, quality=8,
        )  # fmt: skip
        try:
            for batch in frames:
                for frame in batch:
                    writer.append_data(frame)
                    count += 1
        finally:
            writer.close()
        reader = imageio.get_reader(tmp, format="FFMPEG")
        try:
            written = reader.count_frames()
        finally:
            reader.close()
        if written != count:
            raise OSError(f"{tmp}: wrote {count} frames but the file holds {written}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def video_from_context(
    runner: ChunkRunner,
    model: CausalWanModel,
    assets: WanAssets,
    context: Tensor,
    out: str | Path,
    *,
    seconds: float = 5.0,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """AR rollout of `runner` (the dense `EagerRunner` or a sparsified `model`) on the text
    context [1, text_len, text_dim] (`runtime.wan_assets.encode_prompt`) → streamed VAE
    decode → MP4 at `out`; returns the frame count. Runs on the context's device and dtype."""
    cfg = model.config
    if assets.latent_channels != cfg.in_channels:
        raise ValueError(
            f"the VAE's {assets.latent_channels} latent channels are not the model's "
            f"in_channels {cfg.in_channels}"
        )
    latents = generate(
        runner,
        context,
        num_chunks_for(seconds, assets.temporal_factor),
        latent_shape=(cfg.in_channels, cfg.latent_height, cfg.latent_width),
        seed=seed,
        progress=progress,
    )
    return write_mp4(out, decode_frames(assets.vae, latents, progress))
