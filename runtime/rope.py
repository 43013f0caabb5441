"""Wan2.1's 3-axis rotary position embedding (frame, row, column).

The head dimension D is split as Wan does: D - 4·(D//6) channels rotate with the frame index,
2·(D//6) with the token row and 2·(D//6) with the token column; each axis has its own table
of `positions` angles with base `theta`. Adjacent channel pairs (2i, 2i+1) form one rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the (frame, row, column) axes for one head of `head_dim` channels."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def _angles(positions: int, channels: int, theta: float) -> Tensor:
    """[positions, channels/2] float64 rotation angles of one axis."""
    inv_freq = 1.0 / theta ** (torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


class Rope3d(nn.Module):
    """Cos/sin tables of the three axes and the per-token rotation of a chunk of frames."""

    def __init__(self, head_dim: int, positions: int = 1024, theta: float = 10000.0):
        super().__init__()
        self.positions = positions
        for axis, channels in zip(("frame", "row", "col"), axis_dims(head_dim), strict=True):
            angles = _angles(positions, channels, theta)
            # Tables are derived data, not weights: kept out of the state_dict.
            self.register_buffer(f"{axis}_cos", angles.cos().float(), persistent=False)
            self.register_buffer(f"{axis}_sin", angles.sin().float(), persistent=False)

    def forward(
        self,
        start_frame: int | Tensor,
        num_frames: int,
        height: int,
        width: int,
        frame_positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [num_frames·height·width, head_dim/2] (float32).

        Token order is frame-major then row then column, matching the patch embedding.
        Frame f sits at position `start_frame + f`, or at `frame_positions[f]` when that
        int64 [num_frames] tensor is given (teacher forcing puts a clean and a noisy copy of
        a clip at the same positions; `start_frame` is then ignored). `start_frame` may be a
        0-dim int64 tensor: the frame rows are gathered by tensor indexing so that a traced
        graph keeps it as a runtime input.
        """
        device = self.frame_cos.device
        if frame_positions is None:
            frames = torch.arange(num_frames, device=device) + start_frame
        else:
            frames = frame_positions.to(device)
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        return (
            self._grid(self.frame_cos[frames], self.row_cos[rows], self.col_cos[cols]),
            self._grid(self.frame_sin[frames], self.row_sin[rows], self.col_sin[cols]),
        )

    @staticmethod
    def _grid(frame: Tensor, row: Tensor, col: Tensor) -> Tensor:
        f, h, w = frame.shape[0], row.shape[0], col.shape[0]
        table = torch.cat(
            [
                frame[:, None, None, :].expand(f, h, w, -1),
                row[None, :, None, :].expand(f, h, w, -1),
                col[None, None, :, :].expand(f, h, w, -1),
            ],
            dim=-1,
        )
        return table.reshape(f * h * w, -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, D] by cos/sin [L, D/2]; computed in float32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
