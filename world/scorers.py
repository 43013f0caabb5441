"""The learned block scorer of the world model: trained on its own attention, measured by recall.

The scorer of each layer (a `patterns.BlockScorer`) is distilled from the world model's
dense attention (`patterns.train_scorers`): q/k are captured from dense cached rollouts of
*training* scenes (each chunk's queries against the history and the chunk itself, as the
cached rollout computes them); recall is measured on *held-out* scenes. The file holds the
parameters keyed like an `AttentionRuntime`'s (`states.<layer>.scorer.wq`), so it loads into
any runner built on the runtime (`load_world_scorer(runner.runtime, path)`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from patterns import Dense, VideoGeometry, capture_qk, load_scorers, save_scorers, train_scorers
from patterns import scorer_recall as patterns_scorer_recall
from runtime import AttentionRuntime, CausalWanModel, EagerRunner, GlobalCache, generate
from world.latent import frames_to_latents
from world.scenes import render

DEFAULT_SCORERS = Path(__file__).with_name("weights") / "scorers.safetensors"
"""Where the trained scorer of the committed world model lives."""

RECALL_DENSITIES = (0.25, 0.125)


def scorer_host(model: CausalWanModel, geometry: VideoGeometry) -> AttentionRuntime:
    """An attention runtime for `model` whose states hold identity-initialised scorers."""
    cfg = model.config
    return AttentionRuntime(
        Dense(), geometry, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    )


def load_world_scorer(host: torch.nn.Module, path: str | os.PathLike | None = None) -> None:
    """Load a scorer file (default: the committed one) into a runtime or anything holding
    its `states`."""
    load_scorers(host, DEFAULT_SCORERS if path is None else path)


def capture_attention(
    model: CausalWanModel,
    seeds: Sequence[int],
    *,
    prefix_frames: int,
    chunks: int,
    device: torch.device | str,
) -> list[list[tuple[Tensor, Tensor]]]:
    """Per layer, the (q, k) of every self-attention call of dense cached rollouts that
    continue the scenes `seeds` for `chunks` chunks after a clean prefix (float32, on
    `device`)."""
    cfg = model.config
    frames = prefix_frames + chunks * cfg.frames_per_chunk
    scene = render(list(seeds), frames, device=device)
    prefix = frames_to_latents(scene.frames)[:, :, :prefix_frames]
    context = torch.zeros(len(seeds), cfg.text_len, cfg.text_dim, device=device)
    runner = EagerRunner(model, GlobalCache())
    with capture_qk([b.self_attn.attn for b in model.blocks], device=device) as records:
        generate(
            runner,
            context,
            chunks,
            latent_shape=(cfg.in_channels, cfg.latent_height, cfg.latent_width),
            batch_size=len(seeds),
            seed=1,
            prefix=prefix,
            progress=False,
        )
    return [[(q.float(), k.float()) for q, k in layer] for layer in records]


def scorer_recall(
    model: CausalWanModel,
    seeds: Sequence[int],
    path: str | os.PathLike | None,
    geometry: VideoGeometry,
    *,
    chunks: int = 4,
    prefix_frames: int = 3,
    device: torch.device | str = "cpu",
    samples: list[list[tuple[Tensor, Tensor]]] | None = None,
) -> dict[float, float]:
    """Recall of the dense attention mass kept by each query block's top 25 % and 12.5 %
    of key blocks by score, averaged over layers, heads and calls; `path` None measures the
    identity scorer (mean pooling)."""
    host = scorer_host(model, geometry).to(device)
    if path is not None:
        load_world_scorer(host, path)
    if samples is None:
        samples = capture_attention(
            model, seeds, prefix_frames=prefix_frames, chunks=chunks, device=device
        )
    return patterns_scorer_recall(
        [state.scorer for state in host.states],
        samples,
        q_block=geometry.q_block,
        kv_block=geometry.page_size,
        topk=RECALL_DENSITIES,
    )


def train_world_scorer(
    model: CausalWanModel,
    train_seeds: Sequence[int],
    eval_seeds: Sequence[int],
    geometry: VideoGeometry,
    out_path: str | os.PathLike,
    *,
    chunks: int = 5,
    steps: int = 300,
    lr: float = 3e-3,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Train every layer's scorer on rollouts of `train_seeds`; save to `out_path`.

    Returns the training report of `patterns.train_scorers` (recall before = identity, after
    = learned, at 25 %, on `eval_seeds`).
    """
    host = scorer_host(model, geometry).to(device)
    samples = capture_attention(model, train_seeds, prefix_frames=3, chunks=chunks, device=device)
    held_out = capture_attention(model, eval_seeds, prefix_frames=3, chunks=chunks, device=device)
    report = train_scorers(
        [state.scorer for state in host.states],
        samples,
        q_block=geometry.q_block,
        kv_block=geometry.page_size,
        steps=steps,
        lr=lr,
        topk=0.25,
        eval_samples=held_out,
        progress=progress,
    )
    save_scorers(host, out_path)
    return report
