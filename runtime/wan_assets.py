"""Wan2.1's text encoder, tokenizer and VAE from a local diffusers folder, and prompt encoding.

The folder is the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`: `vae/` (AutoencoderKLWan),
`text_encoder/` (UMT5EncoderModel), `tokenizer/`. diffusers and transformers are imported
inside the functions, so `runtime` works without them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Per component: (file alternatives, what they are); each alternative is a tuple of files
# that must all be there.
REQUIRED = {
    "vae": [
        ((("config.json",),), "the VAE config"),
        (
            (
                ("diffusion_pytorch_model.safetensors",),
                ("diffusion_pytorch_model.safetensors.index.json",),
                ("diffusion_pytorch_model.bin",),
            ),
            "the VAE weights",
        ),
    ],
    "text_encoder": [
        ((("config.json",),), "the text encoder config"),
        (
            (
                ("model.safetensors",),
                ("model.safetensors.index.json",),
                ("pytorch_model.bin",),
                ("pytorch_model.bin.index.json",),
            ),
            "the text encoder weights",
        ),
    ],
    "tokenizer": [
        ((("tokenizer_config.json",),), "the tokenizer config"),
        ((("tokenizer.json",), ("spiece.model",)), "the tokenizer vocabulary"),
    ],
}


def missing_wan_file(wan_dir: str | Path) -> str | None:
    """None when `wan_dir` has every file `load_wan_assets` reads, else one line saying
    which file is missing and where it was looked for."""
    wan_dir = Path(wan_dir).expanduser()
    if not wan_dir.is_dir():
        return f"Wan folder {wan_dir} does not exist (expected vae/, text_encoder/, tokenizer/)"
    for component, needs in REQUIRED.items():
        folder = wan_dir / component
        for alternatives, what in needs:
            if not any(all((folder / f).is_file() for f in files) for files in alternatives):
                names = " or ".join("+".join(files) for files in alternatives)
                return f"missing {what}: looked for {names} in {folder}"
    return None


@dataclass
class WanAssets:
    """The non-DiT parts of a Wan2.1 pipeline: tokenizer, UMT5 text encoder, VAE."""

    tokenizer: Any
    text_encoder: Any
    vae: Any

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width (8 for Wan2.1)."""
        return vae_factors(self.vae.config)[0]

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan2.1)."""
        return vae_factors(self.vae.config)[1]


def vae_factors(config: Mapping) -> tuple[int, int]:
    """(spatial, temporal) compression of an AutoencoderKLWan config: every stage halves
    the height and width, the stages flagged in `temperal_downsample` also the time."""
    stages = config["temperal_downsample"]
    return 2 ** len(stages), 2 ** sum(stages)


def read_vae_config(wan_dir: str | Path) -> dict:
    """`vae/config.json` of a Wan folder, without loading the VAE."""
    path = Path(wan_dir).expanduser() / "vae" / "config.json"
    try:
        config = json.loads(path.read_text())
        vae_factors(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileNotFoundError(f"{path}: not a readable AutoencoderKLWan config ({exc})") from exc
    return config


def _dtype_keyword() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_wan_assets(
    wan_dir: str | Path, device: torch.device | str, text_dtype: torch.dtype
) -> WanAssets:
    """Tokenizer, text encoder (in `text_dtype`) and VAE (float32, as diffusers' Wan pipeline
    runs it) from `wan_dir`, on `device`; a missing file is a FileNotFoundError saying which."""
    problem = missing_wan_file(wan_dir)
    if problem:
        raise FileNotFoundError(problem)
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    wan_dir = Path(wan_dir).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(wan_dir / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(
        wan_dir / "text_encoder", **{_dtype_keyword(): text_dtype}
    )
    vae = AutoencoderKLWan.from_pretrained(wan_dir / "vae", torch_dtype=torch.float32)
    return WanAssets(tokenizer, text_encoder.to(device).eval(), vae.to(device).eval())


@torch.no_grad()
def encode_prompt(
    assets: WanAssets, prompt: str, text_len: int, expected_dim: int | None = None
) -> Tensor:
    """UMT5 embeddings [1, text_len, text_dim] of `prompt` as Wan computes them: tokens
    padded or truncated to `text_len` (512 for Wan), the padding positions set to zero.
    `expected_dim` (the DiT's text_dim) is checked."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if expected_dim is not None and assets.text_dim != expected_dim:
        raise ValueError(
            f"the text encoder's width {assets.text_dim} is not the model's text_dim {expected_dim}"
        )
    device = next(assets.text_encoder.parameters()).device
    tokens = assets.tokenizer(
        [prompt],
        padding="max_length",
        max_length=text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    hidden = assets.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)
