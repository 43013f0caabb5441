"""Configuration of the reference causal Wan model: presets and the exact parameter count.

Plain Python: the config only describes the architecture; `runtime/model.py` builds it. Its
one import from this project is the default chunk length (`patterns.geometry.FRAMES_PER_CHUNK`,
Self-Forcing's 3 latent frames), so that every default of it is the same. The parameter count
is derived from the formulas of each layer so that a test can check the module against it
without trusting either side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from patterns.geometry import FRAMES_PER_CHUNK

ATTN_IMPLS = ("sdpa", "sdpa_kw", "unfused", "flex")

# Patch of the Conv3d embedding (frames, height, width): Wan2.1's (1, 2, 2).
PATCH_SIZE = (1, 2, 2)


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a causal Wan2.1-style video DiT.

    `latent_height` x `latent_width` is the VAE latent grid of one frame; the (1, 2, 2) patch
    embedding turns it into `tokens_per_frame` tokens. `num_kv_heads` (default `num_heads`)
    enables grouped-query attention for tests; the released Wan models use full heads.
    """

    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    text_dim: int
    text_len: int
    in_channels: int
    out_channels: int
    latent_height: int
    latent_width: int
    freq_dim: int = 256
    frames_per_chunk: int = FRAMES_PER_CHUNK
    num_kv_heads: int | None = None
    attn_impl: str = "sdpa"
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_positions: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in (
            "dim",
            "num_heads",
            "num_layers",
            "ffn_dim",
            "text_dim",
            "text_len",
            "in_channels",
            "out_channels",
            "latent_height",
            "latent_width",
            "freq_dim",
            "frames_per_chunk",
            "num_kv_heads",
            "rope_positions",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"WanConfig.num_kv_heads ({self.num_kv_heads}) must divide "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"WanConfig head_dim = dim / num_heads must be even and >= 6 for the 3-axis "
                f"RoPE, got {self.head_dim}"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        for name, patch in (("latent_height", PATCH_SIZE[1]), ("latent_width", PATCH_SIZE[2])):
            value = getattr(self, name)
            if value % patch:
                raise ValueError(
                    f"WanConfig.{name} must be a multiple of the patch size {patch}, got {value}"
                )
            if value // patch > self.rope_positions:
                raise ValueError(
                    f"WanConfig.{name} // {patch} = {value // patch} exceeds the RoPE table "
                    f"({self.rope_positions} positions)"
                )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(
                f"WanConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid_height(self) -> int:
        """Token rows per frame (latent height / patch)."""
        return self.latent_height // PATCH_SIZE[1]

    @property
    def grid_width(self) -> int:
        """Token columns per frame (latent width / patch)."""
        return self.latent_width // PATCH_SIZE[2]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def max_frames(self) -> int:
        """The most frames a rollout may span: RoPE places frame f at temporal position f,
        and the table holds ``rope_positions`` of them."""
        return self.rope_positions

    @classmethod
    def preset(cls, name: str, **overrides) -> WanConfig:
        """A named preset (`tiny`, `tiny_misaligned`, `world`, `wan2.1-1.3b`) with fields
        overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset name {name!r}; expected one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"WanConfig.preset got unknown overrides {sorted(unknown)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_TINY = WanConfig(
    dim=64,
    num_heads=4,
    num_layers=2,
    ffn_dim=128,
    text_dim=32,
    text_len=8,
    in_channels=4,
    out_channels=4,
    latent_height=16,
    latent_width=16,
)

PRESETS: dict[str, WanConfig] = {
    "tiny": _TINY,
    # 5 x 7 = 35 tokens per frame: frames never align with 16/32/64/128-token blocks.
    "tiny_misaligned": dataclasses.replace(_TINY, latent_height=10, latent_width=14),
    # The reference world's model: 64x64 frames as 12x32x32 space-to-depth latents, 16 x 16 =
    # 256 tokens per frame. No text: the world passes a constant zero context [B, 1, 16] and
    # conditions on a clean prefix. ~2.7 M parameters; head_dim 32 (a PBSA kernel size).
    "world": WanConfig(
        dim=160,
        num_heads=5,
        num_layers=6,
        ffn_dim=640,
        text_dim=16,
        text_len=1,
        in_channels=12,
        out_channels=12,
        latent_height=32,
        latent_width=32,
        rope_positions=1024,
    ),
    # Wan2.1-T2V-1.3B at 480x832 (VAE stride 8): 60 x 104 latent, 30 x 52 = 1560 tokens.
    "wan2.1-1.3b": WanConfig(
        dim=1536,
        num_heads=12,
        num_layers=30,
        ffn_dim=8960,
        text_dim=4096,
        text_len=512,
        in_channels=16,
        out_channels=16,
        latent_height=60,
        latent_width=104,
    ),
}


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def wan_parameter_count(config: WanConfig) -> int:
    """Exact number of parameters of `CausalWanModel(config)`, from the layer formulas."""
    d, kv = config.dim, config.num_kv_heads * config.head_dim
    patch = PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2]
    attention = (
        2 * _linear(d, d)  # q, o
        + 2 * _linear(d, kv)  # k, v
        + d
        + kv  # RMSNorm weights on q and k
    )
    block = (
        2 * attention  # self- and cross-attention
        + 2 * d  # affine LayerNorm before cross-attention
        + _linear(d, config.ffn_dim)
        + _linear(config.ffn_dim, d)
        + 6 * d  # modulation
    )
    return (
        config.in_channels * d * patch
        + d  # Conv3d patch embedding
        + _linear(config.text_dim, d)
        + _linear(d, d)  # text embedding
        + _linear(config.freq_dim, d)
        + _linear(d, d)  # time embedding
        + _linear(d, 6 * d)  # time projection
        + config.num_layers * block
        + _linear(d, config.out_channels * patch)
        + 2 * d  # head and its modulation
    )
