"""Sequences that are not purely video (MM-DiT joint text-video attention) and geometries that
are not the model's frames: dense with a reason or an error, never a silent rewrite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patterns import Dense, PersistentLocal, VideoGeometry
from sparsify import sparsify

DIM, TEXT_DIM, HEADS = 32, 8, 2
SPARSE = PersistentLocal(persistent_blocks=0, window_frames=1, local_topk=1, radius_frames=0)


class Joint(nn.Module):
    """Video tokens (4x4 per frame) and text tokens in one self-attention sequence.

    patch: "conv" (a Conv3d (1, 2, 2) patch embedding on 8x8 latents) or "flat" (4x4 latents,
    one token per latent pixel: the graph shows no frame size). join: "stream" (the hidden
    states are concatenated before the block) or "heads" (q, k, v of each stream are
    concatenated along the sequence after their projections, as in SD3) or None (video only).
    """

    def __init__(self, patch: str = "conv", join: str | None = "stream"):
        super().__init__()
        torch.manual_seed(0)
        self.join = join
        if patch == "conv":
            self.patch = nn.Conv3d(4, DIM, (1, 2, 2), stride=(1, 2, 2))
        else:
            self.patch = nn.Linear(4, DIM)
        self.text = nn.Linear(TEXT_DIM, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.text_qkv = nn.Linear(DIM, 3 * DIM)
        self.o = nn.Linear(DIM, DIM)

    def _heads(self, x: Tensor, proj: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        return proj(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)  # BHLD

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: Tensor) -> Tensor:
        if isinstance(self.patch, nn.Conv3d):
            video = self.patch(x).flatten(2).transpose(1, 2)
        else:
            video = self.patch(x.flatten(2).transpose(1, 2))
        text = self.text(context)
        if self.join == "stream":
            seq = torch.cat([text, video], dim=1)
            q, k, v = self._heads(seq, self.qkv)
        elif self.join == "heads":
            seq = torch.cat([text, video], dim=1)
            pairs = zip(self._heads(text, self.text_qkv), self._heads(video, self.qkv), strict=True)
            q, k, v = (torch.cat(pair, dim=2) for pair in pairs)
        else:
            seq = video
            q, k, v = self._heads(seq, self.qkv)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return (seq + self.o(out))[:, seq.shape[1] - video.shape[1] :]


def _inputs(patch: str, frames: int, text: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    side = 8 if patch == "conv" else 4
    x = torch.randn(1, 4, frames, side, side, generator=generator)
    context = torch.randn(1, text, TEXT_DIM, generator=generator)
    return x, torch.zeros(1, frames), context, 0


def _text_effect(fn, inputs) -> float:
    """How much a new text changes the output (relative)."""
    x, t, context, s = inputs
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = fn(x, t, context, s), fn(x, t, other, s)
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("join", ["stream", "heads"])
@pytest.mark.parametrize("patch", ["conv", "flat"])
@pytest.mark.parametrize("text", [16, 5])  # 16 + 48: whole frames of 16; 5 + 48: not
def test_joint_attention_is_dense_with_a_reason_in_full_sequence_mode(patch, join, text):
    model = Joint(patch, join).eval()
    inputs = _inputs(patch, frames=3, text=text)
    geometry = VideoGeometry(16, 1, 16, 16)
    with pytest.raises(ValueError, match="(?s)no self-attention site can be rewritten.*joint"):
        sparsify(model, inputs, SPARSE, geometry, mode="full_sequence")
    module = sparsify(model, inputs, SPARSE, geometry, mode="full_sequence", allow_dense=True)
    (row,) = module.plan.rows
    assert row.kind == "self" and row.decision == "kept"
    assert "joint attention" in row.reason and f"[{text}, 48]" in row.reason
    effect = _text_effect(model, inputs)
    assert effect > 1e-3
    assert _text_effect(module, inputs) == pytest.approx(effect, rel=1e-4)


@pytest.mark.parametrize("join", ["stream", "heads"])
def test_joint_attention_the_size_of_a_chunk_is_not_rewritten_in_cached_mode(join):
    # 16 text + 2 frames of 16 tokens = 48 = one chunk of 3 frames: only the graph tells.
    model = Joint("flat", join).eval()
    inputs = _inputs("flat", frames=2, text=16)
    with pytest.raises(ValueError, match="no self-attention site can be rewritten.*joint"):
        sparsify(model, inputs, Dense(), VideoGeometry(16, 3, 16, 16))


def test_video_only_model_is_rewritten_and_text_is_unused():
    model = Joint("conv", join=None).eval()
    inputs = _inputs("conv", frames=3, text=16)
    module = sparsify(model, inputs, Dense(), VideoGeometry(16, 1, 16, 16), mode="full_sequence")
    assert [r.decision for r in module.plan.rows] == ["rewritten"]
    with torch.no_grad():
        torch.testing.assert_close(module(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


def test_geometry_that_is_not_the_models_frame_size_is_an_error():
    model = Joint("conv", join=None).eval()
    inputs = _inputs("conv", frames=3, text=16)
    # 8 divides the 48 tokens, but the patch embedding makes frames of 4x4 = 16 tokens.
    with pytest.raises(
        ValueError, match=r"geometry: tokens_per_frame=8.*4x4 = 16.*patch embedding"
    ):
        sparsify(model, inputs, SPARSE, VideoGeometry(8, 1, 16, 16), mode="full_sequence")


def test_cuda_graphs_in_full_sequence_mode():
    model = Joint("conv", join=None).eval()
    inputs = _inputs("conv", frames=3, text=16)
    module = sparsify(model, inputs, Dense(), VideoGeometry(16, 1, 16, 16), mode="full_sequence")
    assert module.cuda_graphs is False
    module.cuda_graphs = False
    with pytest.raises(ValueError, match="cuda_graphs"):
        module.cuda_graphs = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_sequence_attention_starts_on_the_models_device():
    # The rewritten layers' block scorers are new parameters: a CUDA model must run (and
    # train) right after sparsify, with no .to() of its own.
    model = Joint("conv", join=None).cuda().eval()
    inputs = tuple(t.cuda() if isinstance(t, Tensor) else t for t in _inputs("conv", 3, 16))
    module = sparsify(model, inputs, SPARSE, VideoGeometry(16, 1, 16, 16), mode="full_sequence")
    assert {p.device.type for p in module.attention.parameters()} == {"cuda"}
    out = module(*inputs)
    assert out.is_cuda and bool(out.isfinite().all())
    out.float().square().mean().backward()
