"""3-axis RoPE against a float64 complex-number oracle written from Wan's definition."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime.rope import Rope3d, apply_rope, axis_dims


def _oracle(x: torch.Tensor, start: int, frames: int, height: int, width: int, theta=1e4):
    """Rotate x [B, L, H, D] as complex pairs; axis channel split D-4(D//6), 2(D//6), 2(D//6)."""
    d = x.shape[-1]
    sixth = d // 6
    angles = []
    for positions, channels in (
        (torch.arange(start, start + frames), d - 4 * sixth),
        (torch.arange(height), 2 * sixth),
        (torch.arange(width), 2 * sixth),
    ):
        inv = theta ** (-torch.arange(0, channels, 2, dtype=torch.float64) / channels)
        angles.append(positions.double()[:, None] * inv[None, :])
    f, h, w = angles
    grid = torch.cat(
        [
            f[:, None, None].expand(frames, height, width, -1),
            h[None, :, None].expand(frames, height, width, -1),
            w[None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(frames * height * width, -1)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(grid), grid)[None, :, None]).flatten(
        -2
    )


@given(
    head_dim=st.sampled_from([8, 16, 32, 128]),
    start=st.integers(0, 1000),
    frames=st.integers(1, 4),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
)
def test_rope_matches_complex_oracle(head_dim, start, frames, height, width):
    rope = Rope3d(head_dim)
    x = torch.randn(
        2, frames * height * width, 3, head_dim, generator=torch.Generator().manual_seed(start)
    )
    cos, sin = rope(start, frames, height, width)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(
        got.double(), _oracle(x, start, frames, height, width), atol=2e-5, rtol=1e-5
    )


def test_wan_axis_split():
    assert axis_dims(128) == (44, 42, 42)
    assert axis_dims(16) == (8, 4, 4)


def test_tensor_start_frame_equals_int():
    rope = Rope3d(16)
    a = rope(5, 3, 2, 2)
    b = rope(torch.tensor(5), 3, 2, 2)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = rope(6, 3, 2, 2)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rope_keeps_dtype(dtype):
    rope = Rope3d(16)
    x = torch.randn(1, 4, 2, 16).to(dtype)
    assert apply_rope(x, *rope(0, 1, 2, 2)).dtype == dtype
