"""`runtime.pixels`: streamed VAE decoding equals diffusers' own decode, MP4s are written
whole or not at all, and the video length maps to chunks as in Self-Forcing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.pixels import _to_uint8, decode_frames, num_chunks_for, write_mp4
from runtime.wan_assets import missing_wan_file

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.8, 1.2, 2.0]


def test_seconds_to_chunks():
    assert num_chunks_for(5.0) == 7  # 21 latent frames -> 81 frames, Self-Forcing's video
    assert num_chunks_for(1.0) == 2  # 16 frames need 5 latent frames
    assert num_chunks_for(0.01) == 1
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        num_chunks_for(0)


def test_streamed_decode_equals_vae_decode():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=MEAN,
        latents_std=STD,
    ).eval()  # fmt: skip
    latents = torch.randn(1, 4, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    pieces = list(decode_frames(vae, latents, progress=False))
    assert [p.shape for p in pieces] == [(1, 24, 40, 3)] + [(4, 24, 40, 3)] * 3
    raw = latents * torch.tensor(STD).view(1, -1, 1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = _to_uint8(vae.decode(raw).sample)
    assert np.array_equal(np.concatenate(pieces), expected)
    with pytest.raises(ValueError, match="z_dim is 4"):
        next(decode_frames(vae, torch.zeros(1, 3, 1, 2, 2)))


def test_write_mp4_is_atomic_and_read_back(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    frames = np.zeros((5, 16, 24, 3), dtype=np.uint8)
    frames[:, :8] = 200
    path = tmp_path / "out" / "v.mp4"
    assert write_mp4(path, iter([frames[:1], frames[1:]])) == 5
    reader = imageio.get_reader(path, format="FFMPEG")
    assert reader.count_frames() == 5 and reader.get_meta_data()["size"] == (24, 16)
    reader.close()

    def broken():
        yield frames
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError, match="decoder failed"):
        write_mp4(tmp_path / "broken.mp4", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial file left


def test_missing_wan_files_are_named(tmp_path):
    assert "does not exist" in missing_wan_file(tmp_path / "nope")
    assert (
        missing_wan_file(tmp_path)
        == f"missing the VAE config: looked for config.json in {tmp_path / 'vae'}"
    )
    for part in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text("{}")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    assert missing_wan_file(tmp_path) == (
        "missing the tokenizer vocabulary: looked for tokenizer.json or spiece.model in "
        f"{tmp_path / 'tokenizer'}"
    )
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(b"")
    assert missing_wan_file(tmp_path) is None
