"""The model's own frame size, read from the captured graph, to check the geometry against.

A geometry whose `tokens_per_frame` divides the sequence length but is not the model's frame
size would be accepted by the block patterns and give a different answer, so the pass derives
the video token grid where the model shows it: the output of its patch embedding (the first
Conv3d of the graph, [B, C, F, H, W]), or else a `patch_size` in the model's config (diffusers'
`WanTransformer3DModel`) applied to its one 5-D input [B, C, F, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from patterns import VideoGeometry
from sparsify.sites.fx import node_shape, op_name

_CONVOLUTIONS = {"conv3d", "Conv3d", "convolution"}


@dataclass(frozen=True)
class VideoGrid:
    """The video's token grid: `frames` x `height` x `width` tokens, and where it was read."""

    frames: int
    height: int
    width: int
    source: str

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} tokens ({self.source})"


def _from_graph(module: GraphModule) -> VideoGrid | None:
    for node in module.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        shape = node_shape(node)
        if op_name(node, module) in _CONVOLUTIONS and shape is not None and len(shape) == 5:
            return VideoGrid(*shape[2:], source=f"the output of the patch embedding {node.name}")
    return None


def _from_config(model: nn.Module, args: tuple, kwargs: dict) -> VideoGrid | None:
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    videos = [
        t
        for t in torch.utils._pytree.tree_leaves((args, kwargs))
        if isinstance(t, Tensor) and t.dim() == 5
    ]
    if not isinstance(patch, (tuple, list)) or len(patch) != 3 or len(videos) != 1:
        return None
    f, h, w = videos[0].shape[2:]
    pt, ph, pw = patch
    return VideoGrid(f // pt, h // ph, w // pw, source=f"the input's FxHxW over patch {patch}")


def video_grid(
    model: nn.Module, module: GraphModule, args: tuple, kwargs: dict
) -> VideoGrid | None:
    """The token grid of the example inputs' video, or None where the model does not show it."""
    return _from_graph(module) or _from_config(model, args, kwargs)


def check_geometry(grid: VideoGrid | None, geometry: VideoGeometry, mode: str) -> None:
    """Raise ValueError naming `geometry` when it does not match the model's frames (`mode`
    as for `sparsify`: in cached mode the example chunk's frame count must match too)."""
    if grid is None:
        return
    if geometry.tokens_per_frame != grid.tokens_per_frame:
        raise ValueError(
            f"geometry: tokens_per_frame={geometry.tokens_per_frame}, but the model's frames "
            f"have {grid.height}x{grid.width} = {grid.tokens_per_frame} tokens (read from "
            f"{grid.source}); pass VideoGeometry(tokens_per_frame={grid.tokens_per_frame}, ...)"
        )
    if mode == "cached" and geometry.frames_per_chunk != grid.frames:
        raise ValueError(
            f"geometry: frames_per_chunk={geometry.frames_per_chunk}, but the example chunk has "
            f"{grid.frames} frames (read from {grid.source})"
        )
