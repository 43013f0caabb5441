"""The reference autoregressive video model: a causal Wan2.1-style DiT in plain torch.

Structure follows Wan2.1 / Self-Forcing's CausalWanModel: Conv3d (1, 2, 2) patch embedding,
per-frame timestep adaLN, self-attention with RMSNorm on q and k and 3-axis RoPE at absolute
frame positions, cross-attention to the text context, GELU-tanh FFN and a modulated head.

The attention itself is a replaceable submodule (`self_attn.attn`, `cross_attn.attn`) taking
q, k, v in BLHD layout [B, L, H, D]; `config.attn_impl` chooses how it is spelled so that the
graph pass sees every common form. Imports nothing else of this project but its config and
RoPE helpers (which import nothing either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from runtime.model_config import PATCH_SIZE, WanConfig
from runtime.rope import Rope3d, apply_rope

# ---------------------------------------------------------------------------------------------
# Attention spellings: forward(q, k, v, attn_mask=None) with q [B, Lq, H, D], k/v [B, Lk, Hkv, D]
# -> [B, Lq, H, D]. All compute the same softmax(q·kᵀ/√D)·v.


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat kv heads for grouped-query attention (a no-op when Hkv == H)."""
    groups = q.shape[2] // k.shape[2]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)


class SdpaAttention(nn.Module):
    """`F.scaled_dot_product_attention` with positional q, k, v."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        k, v = _expand_kv(q, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        return out.transpose(1, 2)


class SdpaKeywordAttention(nn.Module):
    """`F.scaled_dot_product_attention` with q, k, v passed by keyword."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        k, v = _expand_kv(q, k, v)
        out = F.scaled_dot_product_attention(
            query=q.transpose(1, 2),
            key=k.transpose(1, 2),
            value=v.transpose(1, 2),
            attn_mask=attn_mask,
        )
        return out.transpose(1, 2)


class UnfusedAttention(nn.Module):
    """softmax(q @ kᵀ · scale) @ v written out, in float32, cast back to q's dtype."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        k, v = _expand_kv(q, k, v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
        scores = (qh @ kh.transpose(-2, -1)) * scale
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        out = scores.softmax(dim=-1) @ vh
        return out.to(q.dtype).transpose(1, 2)


class FlexAttention(nn.Module):
    """`flex_attention` without a block mask (a dense mask becomes a score_mod)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        k, v = _expand_kv(q, k, v)
        score_mod = None
        if attn_mask is not None:
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            mask = attn_mask.expand(shape)

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(mask[b, h, q_idx, kv_idx], score, float("-inf"))

        out = flex_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod
        )
        return out.transpose(1, 2)


ATTENTION_MODULES: dict[str, type[nn.Module]] = {
    "sdpa": SdpaAttention,
    "sdpa_kw": SdpaKeywordAttention,
    "unfused": UnfusedAttention,
    "flex": FlexAttention,
}


class KVCacheSlot(Protocol):
    """One self-attention layer's view of an eager KV cache (see `runtime.eager`)."""

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values to attend, [B, Lk, Hkv, D]: the cached history then the chunk's k, v
        ([B, Lc, Hkv, D], post-RoPE). Stores the chunk when the cache is committing."""
        ...


# ---------------------------------------------------------------------------------------------
# Layers


class _Attention(nn.Module):
    """Wan's attention parameters: q/k/v/o projections, RMSNorm on q and k, and `self.attn`,
    the replaceable attention spelling."""

    def __init__(self, config: WanConfig):
        super().__init__()
        kv_dim = config.num_kv_heads * config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.q = nn.Linear(config.dim, config.dim)
        self.k = nn.Linear(config.dim, kv_dim)
        self.v = nn.Linear(config.dim, kv_dim)
        self.o = nn.Linear(config.dim, config.dim)
        self.norm_q = nn.RMSNorm(config.dim, eps=config.eps)
        self.norm_k = nn.RMSNorm(kv_dim, eps=config.eps)
        self.attn = ATTENTION_MODULES[config.attn_impl]()


class SelfAttention(_Attention):
    """Wan self-attention: RoPE on q and k at absolute frame positions."""

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, dim] -> q [B, L, H, D], k and v [B, L, Hkv, D]; q and k rotated."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, n, self.num_kv_heads, -1)
        v = self.v(x).view(b, n, self.num_kv_heads, -1)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], attn_mask: Tensor | None = None
    ) -> Tensor:
        """x [B, L, dim] attending to itself (optionally masked) -> [B, L, dim]."""
        q, k, v = self.project(x, rope)
        out = self.attn(q, k, v) if attn_mask is None else self.attn(q, k, v, attn_mask=attn_mask)
        return self.o(out.flatten(2))

    def forward_cached(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCacheSlot) -> Tensor:
        """x [B, Lc, dim] of one chunk attending to the cached history and itself."""
        q, k, v = self.project(x, rope)
        k, v = cache.keys_values(k, v)
        return self.o(self.attn(q, k, v).flatten(2))


class CrossAttention(_Attention):
    """Wan text cross-attention: q from the video tokens, k/v from the embedded context."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, L, dim], context [B, L_text, dim] -> [B, L, dim]."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        k = self.norm_k(self.k(context)).view(b, context.shape[1], self.num_kv_heads, -1)
        v = self.v(context).view(b, context.shape[1], self.num_kv_heads, -1)
        return self.o(self.attn(q, k, v).flatten(2))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, F·T, dim] with per-frame shift/scale [B, F, 1, dim]."""
    frames = shift.shape[1]
    x = x.unflatten(1, (frames, -1))
    return (x * (1 + scale) + shift).flatten(1, 2)


def _gate(y: Tensor, gate: Tensor) -> Tensor:
    """y [B, F·T, dim] scaled by the per-frame gate [B, F, 1, dim]."""
    return (y.unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)


class WanBlock(nn.Module):
    """adaLN self-attention, cross-attention and FFN with Wan's gated residuals."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config)
        self.norm3 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(config)
        self.norm2 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, dim),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        context: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: Tensor | None = None,
        cache: KVCacheSlot | None = None,
    ) -> Tensor:
        """x [B, F·T, dim], e [B, F, 6, dim] (time projection), context [B, L_text, dim]."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            self.modulation.unsqueeze(1) + e
        ).chunk(6, dim=2)
        h = _modulate(self.norm1(x), shift_sa, scale_sa)
        if cache is None:
            h = self.self_attn(h, rope, attn_mask)
        else:
            h = self.self_attn.forward_cached(h, rope, cache)
        x = x + _gate(h, gate_sa)
        x = x + self.cross_attn(self.norm3(x), context)
        h = self.ffn(_modulate(self.norm2(x), shift_ff, scale_ff))
        return x + _gate(h, gate_ff)


class Head(nn.Module):
    """Modulated LayerNorm + Linear to patch pixels of the output channels."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.out_channels * math.prod(PATCH_SIZE))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, F·T, dim], e [B, F, dim] (time embedding) -> [B, F·T, C·1·2·2]."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(_modulate(self.norm(x), shift, scale))


def sinusoidal_embedding(timestep: Tensor, dim: int) -> Tensor:
    """Wan's 1-D sinusoidal embedding: timestep [N] -> [N, dim] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.pow(
        10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    )
    angles = torch.outer(timestep.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


# ---------------------------------------------------------------------------------------------
# The model


def _is_tracing() -> bool:
    """Under compile, export or CUDA-graph capture, where tensor values cannot be read."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    )


class CausalWanModel(nn.Module):
    """Causal Wan2.1 DiT predicting the flow v = ε − x0 of latent video frames."""

    def __init__(self, config: WanConfig):
        super().__init__()
        if not isinstance(config, WanConfig):
            raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.rope = Rope3d(config.head_dim, config.rope_positions, config.rope_theta)
        self._init_weights(config.seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """Seeded, non-degenerate init (no zero head: attention must reach the output).

        Values are drawn on the CPU so that the init does not depend on the device; a model
        built on the meta device keeps its (shape-only) parameters.
        """
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if name.endswith("modulation"):
                value = torch.randn(param.shape, generator=generator) / self.config.dim**0.5
            elif param.ndim >= 2:  # Linear / Conv3d weight: Xavier uniform
                receptive = param[0][0].numel()
                bound = math.sqrt(6.0 / (receptive * (param.shape[0] + param.shape[1])))
                value = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # norm scales around 1
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            else:  # biases
                value = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(value)

    # -- validation -----------------------------------------------------------------------

    def _check_inputs(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        start_frame: int | Tensor,
        attn_mask: Tensor | None,
        chunk: bool,
    ) -> Tensor:
        """Validate the inputs; returns the timestep as [B, F]."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.ndim != 5:
            raise ValueError(
                f"x must be a 5-D latent tensor [B, C, F, H, W], got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        b, c, frames, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, expected in_channels={cfg.in_channels}")
        if (h, w) != (cfg.latent_height, cfg.latent_width):
            raise ValueError(
                f"x latent size {h}x{w} does not match the config's "
                f"{cfg.latent_height}x{cfg.latent_width}"
            )
        fpc = cfg.frames_per_chunk
        if chunk and frames != fpc:
            raise ValueError(f"x must hold exactly frames_per_chunk={fpc} frames, got {frames}")
        if frames == 0 or frames % fpc:
            raise ValueError(
                f"x frame count must be a positive multiple of frames_per_chunk={fpc}, got {frames}"
            )
        if isinstance(start_frame, Tensor):
            if (
                start_frame.ndim != 0
                or start_frame.dtype.is_floating_point
                or (start_frame.dtype == torch.bool)
            ):
                raise ValueError(
                    f"start_frame tensor must be a 0-dim integer tensor, got shape "
                    f"{tuple(start_frame.shape)} and dtype {start_frame.dtype}"
                )
            # A tensor start_frame is a runtime input under capture: check its value only
            # in eager mode, where reading it is allowed (a CUDA-graph replay checks nothing).
            if not _is_tracing() and not 0 <= int(start_frame) <= cfg.rope_positions - frames:
                raise ValueError(
                    f"start_frame={int(start_frame)} with {frames} frames does not fit the "
                    f"RoPE table of {cfg.rope_positions} positions"
                )
        elif isinstance(start_frame, int) and not isinstance(start_frame, bool):
            if not 0 <= start_frame <= cfg.rope_positions - frames:
                raise ValueError(
                    f"start_frame={start_frame} with {frames} frames does not fit the RoPE "
                    f"table of {cfg.rope_positions} positions"
                )
        else:
            raise TypeError(
                f"start_frame must be an int or a 0-dim int64 tensor, got "
                f"{type(start_frame).__name__}"
            )
        if not isinstance(context, Tensor) or context.ndim != 3:
            raise ValueError(
                f"context must be a 3-D tensor [B, L_text, text_dim], got "
                f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}"
            )
        if context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context shape {tuple(context.shape)} does not match batch {b} and "
                f"text_dim={cfg.text_dim}"
            )
        if not isinstance(timestep, Tensor) or tuple(timestep.shape) not in ((b,), (b, frames)):
            raise ValueError(
                f"timestep must have shape [B]=({b},) or [B, F]=({b}, {frames}), got "
                f"{tuple(timestep.shape) if isinstance(timestep, Tensor) else timestep!r}"
            )
        if attn_mask is not None:
            if chunk:
                raise ValueError("attn_mask is not supported with the cached chunk form")
            n = frames * cfg.tokens_per_frame
            if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
                raise ValueError("attn_mask must be a bool tensor")
            if (
                attn_mask.ndim > 4
                or attn_mask.shape[-2:] != (n, n)
                or any(
                    s not in (1, t)
                    for s, t in zip(attn_mask.shape[:-2][::-1], (cfg.num_heads, b), strict=False)
                )
            ):
                raise ValueError(
                    f"attn_mask shape {tuple(attn_mask.shape)} is not broadcastable to "
                    f"[B, H, L, L] = [{b}, {cfg.num_heads}, {n}, {n}]"
                )
        return timestep[:, None].expand(b, frames) if timestep.ndim == 1 else timestep

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        start_frame: int | Tensor,
        attn_mask: Tensor | None = None,
        *,
        frame_positions: Tensor | None = None,
    ) -> Tensor:
        """Flow prediction for latents x [B, C, F, H, W] at absolute frames start_frame + f.

        timestep: [B, F] (per frame) or [B]; context: [B, L_text, text_dim]; attn_mask
        (optional, bool, broadcastable to [B, H, L, L] with L = F·tokens_per_frame) restricts
        self-attention, e.g. to a block-causal pattern for teacher forcing. Without a mask
        every token sees every token of x (the chunk form). `frame_positions` (optional,
        int64 [F]) puts frame f at RoPE position `frame_positions[f]` instead of
        `start_frame + f` (teacher forcing repeats positions). Returns [B, C_out, F, H, W].
        """
        timestep = self._check_inputs(x, timestep, context, start_frame, attn_mask, chunk=False)
        self._check_frame_positions(frame_positions, x.shape[2])
        return self._run(x, timestep, context, start_frame, attn_mask, None, frame_positions)

    def _check_frame_positions(self, frame_positions: Tensor | None, frames: int) -> None:
        """frame_positions must be None or an integer [frames] tensor of RoPE positions."""
        if frame_positions is None:
            return
        if (
            not isinstance(frame_positions, Tensor)
            or frame_positions.dtype.is_floating_point
            or frame_positions.dtype.is_complex
            or frame_positions.dtype == torch.bool
            or tuple(frame_positions.shape) != (frames,)
        ):
            raise ValueError(
                f"frame_positions must be an integer tensor of shape [F]=({frames},), got "
                + (
                    f"shape {tuple(frame_positions.shape)} and dtype {frame_positions.dtype}"
                    if isinstance(frame_positions, Tensor)
                    else type(frame_positions).__name__
                )
            )
        # Values are read only from a CPU tensor in eager mode: a device tensor would cost a
        # host sync on every training step (an out-of-range index still fails the gather).
        if frame_positions.device.type != "cpu" or _is_tracing():
            return
        if (
            int(frame_positions.min()) < 0
            or int(frame_positions.max()) >= self.config.rope_positions
        ):
            raise ValueError(
                f"frame_positions must lie in [0, {self.config.rope_positions}) (the RoPE "
                f"table), got values in [{int(frame_positions.min())}, "
                f"{int(frame_positions.max())}]"
            )

    def forward_cached(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        start_frame: int,
        caches: Sequence[KVCacheSlot],
    ) -> Tensor:
        """One chunk (exactly frames_per_chunk frames) attending to per-layer KV caches.

        Layer i's self-attention attends to `caches[i].keys_values(k, v)` (history ∪ chunk);
        everything else is `forward`. Used by `runtime.eager.EagerRunner`.
        """
        if len(caches) != self.config.num_layers:
            raise ValueError(
                f"caches must hold one slot per layer ({self.config.num_layers}), got {len(caches)}"
            )
        timestep = self._check_inputs(x, timestep, context, start_frame, None, chunk=True)
        return self._run(x, timestep, context, start_frame, None, caches)

    def _run(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        start_frame: int | Tensor,
        attn_mask: Tensor | None,
        caches: Sequence[KVCacheSlot] | None,
        frame_positions: Tensor | None = None,
    ) -> Tensor:
        b, _, frames, _, _ = x.shape
        cfg = self.config
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, F·T, dim]
        dtype = tokens.dtype
        sinus = sinusoidal_embedding(timestep.reshape(-1), cfg.freq_dim).to(dtype)
        e = self.time_embedding(sinus).unflatten(0, (b, frames))  # [B, F, dim]
        e0 = self.time_projection(e).unflatten(2, (6, cfg.dim))  # [B, F, 6, dim]
        ctx = self.text_embedding(context)
        rope = self.rope(start_frame, frames, cfg.grid_height, cfg.grid_width, frame_positions)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            tokens = block(tokens, e0, ctx, rope, attn_mask, cache)
        return self._unpatchify(self.head(tokens, e), frames)

    def _unpatchify(self, x: Tensor, frames: int) -> Tensor:
        """[B, F·h·w, C·pt·ph·pw] -> [B, C, F·pt, h·ph, w·pw]."""
        cfg = self.config
        pt, ph, pw = PATCH_SIZE
        x = x.reshape(x.shape[0], frames, cfg.grid_height, cfg.grid_width, pt, ph, pw, -1)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(
            x.shape[0], cfg.out_channels, frames * pt, cfg.latent_height, cfg.latent_width
        )
