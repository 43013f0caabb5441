"""`sparsify demo`: the world model's labelled panels, and the random-weight preset path."""

import imageio.v3 as iio
import numpy as np
import torch

from sparsify.cli import main
from sparsify.commands.demo import PANEL_GAP, side_by_side
from world.video import BACKGROUND, COUNTER_HEIGHT, GAP, LABEL_HEIGHT

WORLD_SIDE = 64  # the world's frames are 64 x 64 pixels, drawn at scale 4
SCALE = 4


def test_world_demo_writes_three_labelled_panels_and_the_mask(tmp_path, capsys):
    assert main(["demo", "--chunks", "2", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "sparse (PersistentLocal)" in table and "copy the last prefix frame" in table

    mask = iio.imread(tmp_path / "block_mask.png")
    assert mask.ndim == 3 and mask.shape[0] > 100 and mask.std() > 0

    gif = iio.imread(tmp_path / "rollout.gif")[..., :3].astype(int)
    side = WORLD_SIDE * SCALE
    assert gif.shape[0] == 3 + 2 * 3  # the prefix chunk, then every generated frame
    assert gif.shape[1] == LABEL_HEIGHT + side + COUNTER_HEIGHT
    assert gif.shape[2] == 3 * side + 4 * GAP  # three panels, no more, no fewer
    background = np.array(BACKGROUND)
    panels = []
    for i in range(3):
        x = GAP + i * (side + GAP)
        label = gif[0, :LABEL_HEIGHT, x : x + side]
        # A label is drawn over each panel (text pixels differ from the background strip).
        assert (np.abs(label - background).sum(-1) > 60).sum() > 20, f"panel {i} unlabelled"
        panels.append(gif[:, LABEL_HEIGHT : LABEL_HEIGHT + side, x : x + side])
    truth, dense, sparse = panels
    # The prefix is given to both rollouts: the first frame matches the truth everywhere
    # (up to GIF palette rounding); the generated frames do not equal the truth exactly.
    assert np.abs(dense[0] - truth[0]).mean() < 3 and np.abs(sparse[0] - truth[0]).mean() < 3
    assert np.abs(dense[-1] - truth[-1]).sum() > 0 and dense[-1].std() > 0
    counter = gif[:, -COUNTER_HEIGHT:]
    assert np.abs(counter[0] - counter[-1]).sum() > 0  # the frame counter changes


def test_preset_demo_writes_mask_and_side_by_side_animation(tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--chunks", "4", "--out", str(tmp_path)]) == 0
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
