"""The GIF writer and the error-vs-horizon plot."""

import imageio.v3 as iio
import numpy as np
import pytest

from world.scenes import render
from world.video import (
    BACKGROUND,
    COUNTER_HEIGHT,
    GAP,
    LABEL_HEIGHT,
    plot_error_vs_horizon,
    write_panels_gif,
)


@pytest.fixture(scope="module")
def clip():
    return render([0], 6).frames[0]  # [F, 3, 64, 64]


def test_gif_reads_back_with_layout_and_labels(tmp_path, clip):
    path = tmp_path / "panels.gif"
    panels = {"ground truth": clip, "dense": clip.flip(-1), "sparse": clip * 0.5}
    write_panels_gif(path, panels, fps=4, scale=2, start_frame=1, prefix_frames=3)
    gif = iio.imread(path, index=None)
    assert gif.shape[0] == 6
    assert gif.shape[1] == LABEL_HEIGHT + 64 * 2 + COUNTER_HEIGHT
    assert gif.shape[2] == 3 * 64 * 2 + 4 * GAP
    rgb = gif[..., :3].astype(int)
    for i in range(3):
        x = GAP + i * (128 + GAP)
        strip = rgb[0, :LABEL_HEIGHT, x : x + 128]
        assert (np.abs(strip - np.array(BACKGROUND)).sum(-1) > 60).sum() > 20
    # The frames sit where documented (GIF palettes are lossy: compare loosely).
    truth = ((clip.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    shown = rgb[:, LABEL_HEIGHT : LABEL_HEIGHT + 128 : 2, GAP : GAP + 128 : 2]
    assert np.abs(shown - truth).mean() < 8
    # Counters differ from frame to frame; prefix frames carry a longer text.
    counters = rgb[:, -COUNTER_HEIGHT:]
    assert all((counters[f] != counters[f + 1]).any() for f in range(5))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_gif_bad_panels_leave_no_file(tmp_path, clip):
    path = tmp_path / "bad.gif"
    with pytest.raises(ValueError, match="one shape"):
        write_panels_gif(path, {"a": clip, "b": clip[:3]}, fps=4)
    with pytest.raises(ValueError, match="fps"):
        write_panels_gif(path, {"a": clip}, fps=0)
    with pytest.raises(ValueError, match="non-empty dict"):
        write_panels_gif(path, {}, fps=4)
    assert not list(tmp_path.iterdir())


def test_plot_error_vs_horizon(tmp_path):
    records = [
        {"pattern": "dense", "mse": {18: 0.01, 72: 0.02, 180: 0.05}},
        {"pattern": "topk", "scorer": "learned", "mse": {"18": 0.012, "72": None, "180": 0.09}},
    ]
    path = tmp_path / "err.png"
    plot_error_vs_horizon(records, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert iio.imread(path).shape[0] > 100
    with pytest.raises(ValueError, match="'pattern'"):
        plot_error_vs_horizon([{"mse": {1: 1.0}}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no positive"):
        plot_error_vs_horizon([{"pattern": "a", "mse": {1: None}}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
