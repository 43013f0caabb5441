"""Attention-mass recall: how much of the dense attention a block selection keeps.

Recall of a selection is the softmax attention weight (of the dense, unmasked attention)
that falls inside the selected key blocks, averaged over query rows. 1.0 means the sparse
pattern loses nothing; it is the quantity block scorers are trained and judged on.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from patterns.files import atomic_path
from patterns.scoring import block_attention_mass, query_block_rows
from patterns.selection import topk_mask

__all__ = [
    "attention_mass_recall",
    "plot_block_mask",
    "plot_recall_heatmap",
    "topk_recall",
]


def _check_bmn(x: Tensor, name: str, dims: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D {dims}, got shape {tuple(x.shape)}")


def _weighted_recall(kept: Tensor, row_weights: Tensor | None) -> Tensor:
    """kept ``[B, H, M]`` mass kept per query block → ``[H]``, rows weighted, batch averaged."""
    if row_weights is None:
        return kept.mean(dim=(0, 2))
    row_weights = row_weights.to(device=kept.device, dtype=kept.dtype)
    if row_weights.shape != kept.shape[2:]:
        raise ValueError(
            f"row_weights must be [M={kept.shape[2]}] (rows per query block), "
            f"got {tuple(row_weights.shape)}"
        )
    return (kept * row_weights).sum(2).mean(0) / row_weights.sum()


def attention_mass_recall(
    q: Tensor,
    k: Tensor,
    visible: Tensor,
    q_block: int,
    kv_block: int,
    *,
    scale: float | None = None,
) -> Tensor:
    """Per-head recall of a block-visibility pattern against dense attention.

    q ``[B, Lq, H, D]``, k ``[B, Lk, Hkv, D]`` (BLHD, contiguous keys in blocks of
    ``kv_block``); visible: bool ``[B, H, Mq, N]`` (which key blocks each query block sees).
    Returns float32 ``[H]``: the dense attention mass inside the visible blocks, averaged over
    all query rows (a partial last query block counts by its rows) and over the batch.
    """
    mass = block_attention_mass(q, k, q_block, kv_block, scale=scale)
    _check_bmn(visible, "visible", "[B, H, Mq, N]")
    if visible.dtype != torch.bool:
        raise TypeError(f"visible must be a bool tensor [B, H, Mq, N], got {visible.dtype}")
    if visible.shape != mass.shape:
        raise ValueError(
            f"visible must have shape [B, H, Mq, N] = {list(mass.shape)} for these q, k and "
            f"block sizes, got {list(visible.shape)}"
        )
    kept = (mass * visible.to(mass.device)).sum(-1)
    rows = query_block_rows(q.shape[1], q_block, device=mass.device)
    return _weighted_recall(kept, rows).float()


def topk_recall(
    scores: Tensor, mass: Tensor, k: int, *, row_weights: Tensor | None = None
) -> Tensor:
    """Recall of selecting each query block's top-``k`` key blocks by ``scores``.

    scores: ``[B, H, M, N]`` from any scorer (higher = keep); mass: ``[B, H, M, N]`` from
    ``block_attention_mass``; row_weights: optional ``[M]`` rows per query block
    (``query_block_rows``) so a partial last block counts by its rows (default: equal).
    Returns float32 ``[H]``, averaged over query blocks and batch.
    """
    _check_bmn(scores, "scores", "[B, H, M, N]")
    _check_bmn(mass, "mass", "[B, H, M, N]")
    if scores.shape != mass.shape:
        raise ValueError(
            f"scores and mass must have the same [B, H, M, N] shape, "
            f"got {list(scores.shape)} and {list(mass.shape)}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be an int in [1, {scores.shape[-1]}] (key blocks), got {k!r}")
    keep = topk_mask(scores.to(mass.device), k)
    kept = (mass * keep).sum(-1)
    return _weighted_recall(kept, row_weights).float()


def _new_figure(width: float, height: float):
    """A pyplot-free Agg figure: no global backend switch, safe in threads and headless."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_2d_cpu(x: Tensor, name: str, dims: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor {dims}, got {tuple(x.shape)}")
    return x.detach().to("cpu")


def plot_recall_heatmap(
    recall: Tensor, path: str | os.PathLike, *, title: str = "Attention-mass recall"
) -> None:
    """Write a PNG heat map of recall ``[layers, heads]`` (values in [0, 1], annotated)."""
    data = _as_2d_cpu(recall, "recall", "[layers, heads]").float()
    layers, heads = data.shape
    fig = _new_figure(
        min(16.0, max(4.0, 0.55 * heads + 2.0)), min(16.0, max(3.0, 0.32 * layers + 1.5))
    )
    ax = fig.add_subplot()
    image = ax.imshow(data.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (mean {data.mean().item():.3f})")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    if layers * heads <= 400:  # beyond that the numbers are unreadable anyway
        for (i, j), value in zip(
            torch.cartesian_prod(torch.arange(layers), torch.arange(heads)).tolist(),
            data.flatten().tolist(),
            strict=True,
        ):
            colour = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="recall (fraction of dense attention mass kept)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


def plot_block_mask(
    visible: Tensor, path: str | os.PathLike, title: str = "Block visibility"
) -> None:
    """Write a PNG of one head's block map ``[Mq, N]``.

    A bool tensor is drawn as visible / hidden; a float tensor (e.g. one head of
    ``block_attention_mass``) as attention mass on a colour scale.
    """
    data = _as_2d_cpu(visible, "visible", "[Mq, N]")
    rows, cols = data.shape
    fig = _new_figure(min(16.0, max(4.0, 0.2 * cols + 2.5)), min(12.0, max(3.0, 0.2 * rows + 1.5)))
    ax = fig.add_subplot()
    if data.dtype == torch.bool:
        from matplotlib.colors import ListedColormap

        image = ax.imshow(
            data.float().numpy(),
            cmap=ListedColormap(["#f2f2f2", "#1f4e99"]),
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
        )
        bar = fig.colorbar(image, ax=ax, ticks=[0.25, 0.75])
        bar.ax.set_yticklabels(["hidden", "visible"])
        ax.set_title(f"{title} ({data.float().mean().item():.1%} of blocks visible)")
    else:
        image = ax.imshow(
            data.float().numpy(), cmap="magma", aspect="auto", interpolation="nearest"
        )
        fig.colorbar(image, ax=ax, label="attention mass")
        ax.set_title(title)
    ax.set_xlabel("key block (page)")
    ax.set_ylabel("query block")
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
