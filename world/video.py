"""Pictures of the world: labelled side-by-side GIFs and error-vs-horizon plots.

GIF layout (pixels): panels in a row, each ``W * scale`` wide, separated by ``GAP`` pixels
and with ``GAP`` at the left and right edges, so the width is
``P * W * scale + (P + 1) * GAP``. Above the frames is a label strip of ``LABEL_HEIGHT``
(one label per panel), below them a counter strip of ``COUNTER_HEIGHT`` ("frame 17/48",
with "prefix" on the given clean frames), so the height is
``LABEL_HEIGHT + H * scale + COUNTER_HEIGHT``. Text is drawn once per distinct string by
matplotlib (Agg, no pyplot) and composited with numpy. Files are written atomically: a
temporary file in the destination folder, then ``os.replace``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from patterns.files import atomic_path

GAP = 4
LABEL_HEIGHT = 20
COUNTER_HEIGHT = 20
BACKGROUND = (24, 24, 24)
_TEXT_DPI = 100
_FONT_PT = 10


def _atomic_target(path: str | os.PathLike, suffix: str):
    """A temporary path next to ``path`` (see `patterns.files.atomic_path`); the folder must
    exist (a typo in it is an error, not a new folder)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: folder {str(path.parent)!r} does not exist")
    return atomic_path(path, suffix)


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / _TEXT_DPI, height_px / _TEXT_DPI), dpi=_TEXT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _text_strip(text: str, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: ``text`` centred in light grey on the background."""
    fig = _figure(width, height)
    fig.patch.set_facecolor(np.array(BACKGROUND) / 255)
    fig.text(0.5, 0.5, text, ha="center", va="center", color="#e6e6e6", fontsize=_FONT_PT)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:height, :width, :3])


def _to_uint8(frames: Tensor, scale: int) -> np.ndarray:
    """frames [F, 3, H, W] in [-1, 1] -> uint8 [F, H*scale, W*scale, 3], nearest upscaling."""
    pixels = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    return pixels.repeat(scale, axis=1).repeat(scale, axis=2)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def write_panels_gif(
    path: str | os.PathLike,
    panels: dict[str, Tensor],
    *,
    fps: float,
    scale: int = 4,
    start_frame: int = 0,
    prefix_frames: int = 0,
) -> None:
    """Write panels (label -> frames [F, 3, H, W] in [-1, 1], all one shape) as one GIF.

    Frame f is labelled "frame {start_frame + f + 1}/{start_frame + F}" (1-based within the
    whole clip when the panels start at clip frame ``start_frame``), with "(prefix)" when
    ``start_frame + f < prefix_frames`` (the clean frames the continuation was given).
    """
    if not isinstance(panels, dict) or not panels:
        raise ValueError("panels must be a non-empty dict of label -> frames [F, 3, H, W]")
    shapes = {tuple(v.shape) if isinstance(v, Tensor) else None for v in panels.values()}
    shape = next(iter(shapes))
    if len(shapes) != 1 or shape is None or len(shape) != 4 or shape[1] != 3 or shape[0] < 1:
        raise ValueError(
            "panels must all be tensors of one shape [F, 3, H, W], "
            f"got shapes {sorted(map(str, shapes))}"
        )
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    _check_int("scale", scale, 1)
    _check_int("start_frame", start_frame, 0)
    _check_int("prefix_frames", prefix_frames, 0)

    F, _, H, W = shape
    P = len(panels)
    pw, ph = W * scale, H * scale
    width = P * pw + (P + 1) * GAP
    canvas = np.empty((F, LABEL_HEIGHT + ph + COUNTER_HEIGHT, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for i, (label, frames) in enumerate(panels.items()):
        x = GAP + i * (pw + GAP)
        canvas[:, :LABEL_HEIGHT, x : x + pw] = _text_strip(str(label), pw, LABEL_HEIGHT)
        canvas[:, LABEL_HEIGHT : LABEL_HEIGHT + ph, x : x + pw] = _to_uint8(frames, scale)
    total = start_frame + F
    for f in range(F):
        clip_frame = start_frame + f
        text = f"frame {clip_frame + 1}/{total}" + (
            " (prefix)" if clip_frame < prefix_frames else ""
        )
        canvas[f, LABEL_HEIGHT + ph :] = _text_strip(text, width, COUNTER_HEIGHT)

    with _atomic_target(path, ".gif") as tmp:
        iio.imwrite(tmp, canvas, extension=".gif", duration=1000.0 / fps, loop=0)


def _series(values, metric: str, label: str) -> tuple[list[int], list[float]]:
    if not isinstance(values, dict):
        raise ValueError(
            f"record {label!r}: {metric!r} must be a dict horizon -> value, got {values!r}"
        )
    points = sorted((int(h), v) for h, v in values.items())
    keep = [(h, float(v)) for h, v in points if v is not None and math.isfinite(v) and v > 0]
    return [h for h, _ in keep], [v for _, v in keep]


def plot_error_vs_horizon(
    records: list[dict], path: str | os.PathLike, metric: str = "mse"
) -> None:
    """Write a PNG: one line per record, x = horizon in frames, y = ``metric`` on a log axis.

    A record is a dict with ``"pattern"`` (and optionally ``"scorer"``; the line is labelled
    "pattern/scorer") and ``metric`` -> {horizon: value} (as ``metrics.by_horizon`` returns;
    string keys from JSON are accepted). Missing values (None, NaN) and values <= 0, which
    a log axis cannot show, are left out of their line.
    """
    if not isinstance(records, list) or not records:
        raise ValueError("records must be a non-empty list of dicts")
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if not isinstance(r, dict) or "pattern" not in r or metric not in r:
            keys = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ValueError(f"each record needs 'pattern' and {metric!r}, got {keys}")
        label = str(r["pattern"]) + (f"/{r['scorer']}" if r.get("scorer") else "")
        if label in lines:
            raise ValueError(f"records: two records are labelled {label!r}")
        lines[label] = _series(r[metric], metric, label)
    if not any(xs for xs, _ in lines.values()):
        raise ValueError(f"records hold no positive finite {metric!r} value to plot")

    fig = _figure(640, 420)
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("horizon (frames)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs horizon")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with _atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
