"""`sparsify demo` on the embedded default: it writes its pictures and the panels differ."""

import imageio.v3 as iio
import numpy as np
import torch

from sparsify.cli import main
from sparsify.commands.demo import PANEL_GAP, side_by_side


def test_demo_writes_mask_and_side_by_side_animation(tmp_path, capsys):
    assert main(["demo", "--chunks", "4", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "dense (Self-Forcing cache)" in table and "sparse (PersistentLocal)" in table

    mask = iio.imread(tmp_path / "block_mask.png")
    assert mask.ndim == 3 and mask.shape[0] > 100 and mask.std() > 0

    frames = iio.imread(tmp_path / "rollout.gif")
    assert frames.shape[0] == 4 * 3  # one GIF frame per latent frame
    width = (frames.shape[2] - PANEL_GAP) // 2
    dense, sparse = frames[..., :width, :3], frames[..., width + PANEL_GAP :, :3]
    assert dense.std() > 0 and sparse.std() > 0
    # The first chunk sees the same frames either way (own frame forced, no history to drop),
    # later chunks differ: the panels must not be identical.
    assert np.abs(dense.astype(int) - sparse.astype(int)).sum() > 0


def test_side_by_side_puts_dense_left_and_sparse_right():
    dense = torch.zeros(4, 2, 8, 8)
    dense[:, :, :4] = 1.0  # top half bright, so the value range is not degenerate
    sparse = dense.flip(-2)
    frames = side_by_side(dense, sparse, height=16)
    assert frames.shape == (2, 16, 2 * 16 + PANEL_GAP, 3)
    left, right = frames[:, :, :16], frames[:, :, 16 + PANEL_GAP :]
    assert (left[:, :8] > left[:, 8:]).all() and (right[:, 8:] > right[:, :8]).all()
