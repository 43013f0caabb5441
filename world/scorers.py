"""The learned block scorer of the world model: trained on its own attention, measured by recall.

The scorer of each layer (a `patterns.BlockScorer`) is distilled from the world model's
dense attention (`patterns.train_scorers`): q/k are captured from dense cached rollouts of
*training* scenes (each chunk's queries against the history and the chunk itself, as the
cached rollout computes them); recall is measured on *held-out* scenes. The file holds the
parameters keyed like an `AttentionRuntime`'s (`states.<layer>.scorer.wq`), so it loads into
any runner built on the runtime (`load_world_scorer(runner.runtime, path)`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from patterns import Dense, VideoGeometry, capture_qk, load_scorers, save_scorers, train_scorers
from patterns import recall_table as patterns_recall_table
from runtime import AttentionRuntime, CausalWanModel, EagerRunner, GlobalCache, generate
from world.files import atomic_write_json
from world.latent import frames_to_latents
from world.scenes import heldout_seeds, render

DEFAULT_SCORERS = Path(__file__).with_name("weights") / "scorers.safetensors"
"""Where the trained scorer of the committed world model lives."""

RECALL_DENSITIES = (0.25, 0.125)

SCORER_TRAIN_SEED, SCORER_VAL_SEED = 1000, 2000
"""First scene seed of the scorer's training and validation scenes (both held in)."""


def world_geometry(model: CausalWanModel, page_size: int = 32) -> VideoGeometry:
    """The world model's page layout: 8 pages of 32 tokens per 256-token frame."""
    cfg = model.config
    return VideoGeometry(cfg.tokens_per_frame, cfg.frames_per_chunk, page_size, page_size)


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


def recall_table(
    model: CausalWanModel,
    seeds: Sequence[int],
    geometry: VideoGeometry,
    scorer_path: str | os.PathLike | None = None,
    *,
    chunks: int = 4,
    prefix_frames: int = 3,
    device: torch.device | str = "cpu",
    samples: list[list[tuple[Tensor, Tensor]]] | None = None,
) -> dict[str, dict[float, float]]:
    """Recall of the dense attention mass kept by each query block's top 25 % and 12.5 % of
    key blocks, averaged over layers, heads and calls of rollouts of `seeds`, for the oracle
    (the true top blocks: the ceiling), the identity scorer (mean pooling) and, with
    `scorer_path`, the learned one: ``{"oracle" | "identity" | "learned": {density: recall}}``.
    One capture and one set of dense targets serve all of them."""
    sets = {"identity": scorer_host(model, geometry).to(device)}
    if scorer_path is not None:
        sets["learned"] = scorer_host(model, geometry).to(device)
        load_world_scorer(sets["learned"], scorer_path)
    if samples is None:
        samples = capture_attention(
            model, seeds, prefix_frames=prefix_frames, chunks=chunks, device=device
        )
    return patterns_recall_table(
        {name: [state.scorer for state in host.states] for name, host in sets.items()},
        samples,
        q_block=geometry.q_block,
        kv_block=geometry.page_size,
        topk=RECALL_DENSITIES,
    )


def train_world_scorer(
    model: CausalWanModel,
    train_seeds: Sequence[int],
    val_seeds: Sequence[int],
    eval_seeds: Sequence[int],
    geometry: VideoGeometry,
    out_path: str | os.PathLike,
    *,
    chunks: int = 4,
    steps: int = 400,
    lr: float = 3e-3,
    device: torch.device | str = "cpu",
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train every layer's scorer on rollouts of `train_seeds` (held-in scenes), stopping
    early on the KL of `val_seeds` (held-in, other scenes); save it to `out_path` and its
    provenance next to it (`provenance_path`).

    Returns the provenance: the recipe, the training report of `patterns.train_scorers`
    (``report``) and ``recall``, the `recall_table` of oracle / identity / learned on the
    held-out `eval_seeds`.
    """
    overlap = set(eval_seeds) & (set(train_seeds) | set(val_seeds))
    if overlap:
        raise ValueError(f"eval_seeds must be held out from training, got {sorted(overlap)}")
    start = time.perf_counter()
    host = scorer_host(model, geometry).to(device)

    def capture(seeds: Sequence[int]) -> list[list[tuple[Tensor, Tensor]]]:
        return capture_attention(model, seeds, prefix_frames=3, chunks=chunks, device=device)

    report = train_scorers(
        [state.scorer for state in host.states],
        capture(train_seeds),
        q_block=geometry.q_block,
        kv_block=geometry.page_size,
        steps=steps,
        lr=lr,
        topk=0.25,
        val_samples=capture(val_seeds),
        progress=progress,
    )
    save_scorers(host, out_path)
    recall = recall_table(
        model,
        eval_seeds,
        geometry,
        out_path,
        chunks=chunks,
        device=device,
        samples=capture(eval_seeds),
    )
    provenance = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
        "recipe": {
            "train_seeds": list(train_seeds),
            "val_seeds": list(val_seeds),
            "eval_seeds": list(eval_seeds),
            "chunks": chunks,
            "prefix_frames": 3,
            "steps": steps,
            "lr": lr,
            "q_block": geometry.q_block,
            "page_size": geometry.page_size,
        },
        "steps_run": len(report["loss"]),
        "best_step": report["best_step"],
        "final_train_kl": report["loss"][-1] if report["loss"] else None,
        "val_kl": report["val_loss"],
        "recall": {name: {str(d): v for d, v in row.items()} for name, row in recall.items()},
    }
    atomic_write_json(provenance_path(out_path), provenance)
    return provenance


def provenance_path(scorer_path: str | os.PathLike) -> Path:
    """The JSON sidecar of a scorer weights file: how it was trained, and its recall."""
    return Path(scorer_path).with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    """Retrain the committed world model's scorer and print oracle / identity / learned
    recall on held-out scenes."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_SCORERS), help="scorer weights file")
    parser.add_argument("--train-seeds", type=int, default=16, help="held-in training scenes")
    parser.add_argument("--val-seeds", type=int, default=4, help="held-in validation scenes")
    parser.add_argument("--eval-seeds", type=int, default=8, help="held-out scenes")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per rollout")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from world.weights import load_world_model

    model = load_world_model(device=args.device)
    provenance = train_world_scorer(
        model,
        list(range(SCORER_TRAIN_SEED, SCORER_TRAIN_SEED + args.train_seeds)),
        list(range(SCORER_VAL_SEED, SCORER_VAL_SEED + args.val_seeds)),
        heldout_seeds(args.eval_seeds),
        world_geometry(model),
        args.out,
        chunks=args.chunks,
        steps=args.steps,
        lr=args.lr,
        device=args.device,
        command="python -m world.scorers " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(
        f"{provenance['steps_run']} steps (best {provenance['best_step']}) in "
        f"{provenance['seconds']:.0f} s on {args.device}; recall on {args.eval_seeds} "
        "held-out scenes:"
    )
    print(
        f"{'scorer':10s}"
        + "".join(f"{'@' + d:>10s}" for d in next(iter(provenance["recall"].values())))
    )
    for name, row in provenance["recall"].items():
        print(f"{name:10s}" + "".join(f"{v:10.4f}" for v in row.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
