"""Teacher forcing: the training pass that sees exactly what the cached rollout sees.

A clip of F clean latent frames (chunks of `frames_per_chunk`) is run as one sequence of 2F
frames, [clean clip ; noisy clip], both halves at the absolute RoPE positions 0…F−1. The
visibility is block-causal over chunks:

* clean chunk j attends to the clean chunks ≤ j — what the rollout's commit pass computes
  (t = 0), so its keys and values are the ones the cache would hold;
* noisy chunk i attends to the clean chunks < i and to itself — a denoising pass of chunk i
  after committing the clean chunks before it.

So the prediction for noisy chunk i equals the rollout's denoising prediction for chunk i
after a clean prefix of i chunks at the same noise ("train and infer alike").

Two spellings of the same visibility: on CUDA each block's `self_attn.attn` is swapped for
`BlockMaskAttention`, compiled `flex_attention` with a `BlockMask` built in block space by
`create_block_mask` (no dense L×L mask on the GPU); elsewhere the model's `attn_mask` path
with the dense bool mask of `block_causal_mask` (small CPU cases: tests).

With a sparse pattern (`attention="pbsa"`) each block's `self_attn.attn` becomes a
`runtime.ClipAttention`: per layer, per call, the block table the cached rollout of that
pattern would use for these q/k (`patterns.training_table.clip_table`: persistent set from
the frames that left the window, top-K inside it, own frames), run by `codegen.pbsa_attention`
over the contiguous K/V. `Dense()` gives exactly the dense visibility above.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from patterns import BlockScorer, Pattern, VideoGeometry
from runtime.clip_attention import ClipAttention
from runtime.model import CausalWanModel

ATTENTION_PATHS = ("auto", "dense", "flex", "pbsa")


def _visible(q_frame: Tensor, k_frame: Tensor, clip_frames: int, frames_per_chunk: int) -> Tensor:
    """Whether sequence frame q_frame may attend to k_frame in [clean ; noisy] (2F frames)."""
    q_noisy, k_noisy = q_frame >= clip_frames, k_frame >= clip_frames
    q_chunk = (q_frame % clip_frames) // frames_per_chunk
    k_chunk = (k_frame % clip_frames) // frames_per_chunk
    clean_key = ~k_noisy & ((k_chunk < q_chunk) | ((k_chunk == q_chunk) & ~q_noisy))
    own_noisy_chunk = k_noisy & q_noisy & (k_chunk == q_chunk)
    return clean_key | own_noisy_chunk


def _check_clip(clip_frames: int, frames_per_chunk: int) -> None:
    if not isinstance(clip_frames, int) or clip_frames <= 0 or clip_frames % frames_per_chunk:
        raise ValueError(
            f"clip_frames must be a positive multiple of frames_per_chunk={frames_per_chunk}, "
            f"got {clip_frames!r}"
        )


def frame_visibility(clip_frames: int, frames_per_chunk: int) -> Tensor:
    """bool [2F, 2F]: row = query frame, column = key frame of the [clean ; noisy] sequence."""
    _check_clip(clip_frames, frames_per_chunk)
    frames = torch.arange(2 * clip_frames)
    return _visible(frames[:, None], frames[None, :], clip_frames, frames_per_chunk)


def block_causal_mask(
    clip_frames: int, frames_per_chunk: int, tokens_per_frame: int, device=None
) -> Tensor:
    """Dense bool [L, L] token mask, L = 2F·tokens_per_frame (the CPU path; tests)."""
    frames = frame_visibility(clip_frames, frames_per_chunk).to(device)
    return frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def teacher_forcing_block_mask(
    clip_frames: int, frames_per_chunk: int, tokens_per_frame: int, device
) -> BlockMask:
    """FlexAttention `BlockMask` of the same visibility over L = 2F·tokens_per_frame tokens,
    built by `create_block_mask` in block space (shared by batch and heads)."""
    _check_clip(clip_frames, frames_per_chunk)

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(
            q_idx // tokens_per_frame, kv_idx // tokens_per_frame, clip_frames, frames_per_chunk
        )

    length = 2 * clip_frames * tokens_per_frame
    return create_block_mask(mask_mod, None, None, length, length, device=device)


@functools.cache
def _compiled_flex():
    # Eager flex_attention materialises the scores; compiled, it runs the fused block-sparse
    # kernel. Compiled once per process (dynamo caches per shape).
    return torch.compile(flex_attention, dynamic=False)


class BlockMaskAttention(nn.Module):
    """Self-attention spelling `forward(q, k, v)` (BLHD [B, L, H(kv), D] -> [B, L, H, D])
    running `flex_attention` under a fixed `BlockMask`; compiled on CUDA."""

    def __init__(self, block_mask: BlockMask):
        super().__init__()
        self.block_mask = block_mask

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Under autocast the RMSNorm'd q, k may stay float32 while v is bf16.
        q, k = q.to(v.dtype), k.to(v.dtype)
        # Inside a compiled region dynamo compiles flex_attention itself.
        compiled = q.is_cuda and not torch.compiler.is_compiling()
        flex = _compiled_flex() if compiled else flex_attention
        out = flex(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=self.block_mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)


class TeacherForcing(nn.Module):
    """The teacher-forcing pass of `model` for clips of `clip_frames` frames.

    `attention="flex"` swaps every block's `self_attn.attn` of `model` for a
    `BlockMaskAttention` (in place; the swapped modules hold no parameters, so the
    state_dict is unchanged); `"dense"` passes the dense mask through the model's
    `attn_mask`; `"auto"` is flex on CUDA and dense elsewhere, or `"pbsa"` when a `pattern`
    is given. `device` is where the mask lives (the model's device).

    `attention="pbsa"` (needs `pattern` and `geometry`, e.g. `world.quality.world_geometry`)
    swaps in a `runtime.ClipAttention` per block (in place; no parameters either): the
    pattern's rollout visibility, scored by `scorers[i]` for layer i (None: identity
    scorers; kept here, not in the model), run by `codegen.pbsa_attention` on `backend`.
    """

    def __init__(
        self,
        model: CausalWanModel,
        clip_frames: int,
        *,
        attention: str = "auto",
        device=None,
        pattern: Pattern | None = None,
        geometry: VideoGeometry | None = None,
        scorers: list[BlockScorer] | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(model, CausalWanModel):
            raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        if (attention == "pbsa") != (pattern is not None) and attention != "auto":
            raise ValueError(
                f"attention={attention!r}: a pattern goes with attention 'pbsa' (or 'auto') only"
            )
        cfg = model.config
        _check_clip(clip_frames, cfg.frames_per_chunk)
        device = torch.device("cpu" if device is None else device)
        if attention == "auto":
            attention = (
                "pbsa" if pattern is not None else "flex" if device.type == "cuda" else "dense"
            )
        self.model, self.clip_frames, self.attention = model, clip_frames, attention
        self.register_buffer(
            "frame_positions", torch.arange(clip_frames, device=device).repeat(2), persistent=False
        )
        self.dense_mask: Tensor | None = None
        args = (clip_frames, cfg.frames_per_chunk, cfg.tokens_per_frame)
        if attention == "pbsa":
            self._swap_clip_attention(pattern, geometry, scorers, backend)
        elif attention == "flex":
            block_mask = teacher_forcing_block_mask(*args, device=device)
            for block in model.blocks:
                block.self_attn.attn = BlockMaskAttention(block_mask)
        else:
            self.dense_mask = block_causal_mask(*args, device=device)

    def _swap_clip_attention(
        self,
        pattern: Pattern,
        geometry: VideoGeometry | None,
        scorers: list[BlockScorer] | None,
        backend: str,
    ) -> None:
        cfg = self.model.config
        if not isinstance(geometry, VideoGeometry):
            raise ValueError(f"geometry: a VideoGeometry goes with a pattern, got {geometry!r}")
        if (geometry.tokens_per_frame, geometry.frames_per_chunk) != (
            cfg.tokens_per_frame,
            cfg.frames_per_chunk,
        ):
            raise ValueError(
                f"geometry {geometry} does not match the model's frames "
                f"({cfg.tokens_per_frame} tokens, {cfg.frames_per_chunk} per chunk)"
            )
        if scorers is not None and len(scorers) != cfg.num_layers:
            raise ValueError(f"scorers: one per layer ({cfg.num_layers}), got {len(scorers)}")
        self.scorers = None if scorers is None else nn.ModuleList(scorers)
        for i, block in enumerate(self.model.blocks):
            block.self_attn.attn = ClipAttention(
                pattern,
                geometry,
                self.clip_frames,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                scorer=None if scorers is None else scorers[i],
                backend=backend,
            )

    def forward(self, clean: Tensor, noisy: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """Flow prediction [B, C_out, F, H, W] for the noisy half.

        clean, noisy: latents [B, C, F, H, W] (F = clip_frames); timestep: [B, F] of the
        noisy frames (the clean half runs at t = 0); context: [B, L_text, text_dim].
        """
        for name, x in (("clean", clean), ("noisy", noisy)):
            if not isinstance(x, Tensor) or x.ndim != 5 or x.shape[2] != self.clip_frames:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{name} must be [B, C, F={self.clip_frames}, H, W] latents, got {got}"
                )
        if clean.shape != noisy.shape:
            raise ValueError(
                f"clean {tuple(clean.shape)} and noisy {tuple(noisy.shape)} must match"
            )
        if not isinstance(timestep, Tensor) or tuple(timestep.shape) != tuple(clean.shape[:1]) + (
            self.clip_frames,
        ):
            got = tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep)
            raise ValueError(
                f"timestep must be [B, F] = ({clean.shape[0]}, {self.clip_frames}), got {got}"
            )
        x = torch.cat([clean, noisy], dim=2)
        t = torch.cat([torch.zeros_like(timestep), timestep], dim=1)
        out = self.model(x, t, context, 0, self.dense_mask, frame_positions=self.frame_positions)
        return out[:, :, self.clip_frames :]


def sample_sigmas(
    batch: int, num_chunks: int, *, generator: torch.Generator, shift: float = 5.0
) -> Tensor:
    """Noise levels [batch, num_chunks] in [0, 1), one per chunk: uniform s warped by
    Self-Forcing's shift, σ = shift·s / (1 + (shift − 1)·s), on the generator's device.

    The shift puts most samples at high noise, where the 4-step sampler spends its passes
    (σ = 1, 0.94, 0.83, 0.62), while still covering every σ, and matches the schedule the
    timesteps were defined with (logit-normal would centre on σ = 0.5, which the sampler
    never visits).
    """
    s = torch.rand(batch, num_chunks, generator=generator, device=generator.device)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_matching_loss(
    teacher_forcing: TeacherForcing,
    clean: Tensor,
    noise: Tensor,
    sigma: Tensor,
    context: Tensor,
    history: Tensor | None = None,
) -> Tensor:
    """MSE of the predicted flow v = ε − x0 on the noisy half (a float32 scalar).

    clean, noise: [B, C, F, H, W]; sigma: [B, F / frames_per_chunk], chunk i's noise level
    (x_t = (1 − σ)·x0 + σ·ε at timestep 1000·σ); context: [B, L_text, text_dim].
    history: what the clean half holds, the frames the noisy chunks attend to (None: the
    clip itself, teacher forcing; else e.g. the model's own rollout of it, clean's shape).
    The target is always the clip's flow.
    """
    fpc = teacher_forcing.model.config.frames_per_chunk
    per_frame = sigma.repeat_interleave(fpc, dim=1)  # [B, F]
    s = per_frame[:, None, :, None, None].to(clean.dtype)
    noisy = (1.0 - s) * clean + s * noise
    flow = teacher_forcing(
        clean if history is None else history, noisy, 1000.0 * per_frame, context
    )
    return torch.nn.functional.mse_loss(flow.float(), (noise - clean).float())
