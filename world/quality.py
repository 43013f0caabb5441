"""Long-horizon quality of every attention pattern on the reference world.

Held-out scenes are continued by the trained world model from a clean prefix (committed
frames, `runtime.generate(..., prefix=...)`) and compared with the ground-truth
continuation. Every contender runs the same scenes with the same noise:

* ``dense`` — Self-Forcing's dense cache holding every frame (eager, SDPA);
* ``dense_window`` — the dense cache rolling over a training clip's worth of frames (the
  world's counterpart of Self-Forcing's 21-frame window);
* ``sink_window``, ``topk``, ``persistent_local`` (the default budget) and
  ``persistent_local_budget`` (the same KV budget as ``sink_window``) on the paged runtime,
  the scored ones with the ``learned`` scorer and with the ``identity`` scorer (mean pooling);
* floors: ``copy_last`` (repeat the last prefix frame) and ``random_model`` (the same preset
  with untrained weights, dense cache).

A record per contender and horizon: ``pattern, scorer, horizon_frames, mse, psnr,
reappear_mse, reappear_pixels, stat_drift, recall_25, recall_12, recall_oracle_25,
recall_oracle_12 (the ceiling of any scorer), peak_kv_bytes, seconds``.
Errors at a horizon H are averaged over the last training clip's worth of generated frames
before H (frames ``(H - TRAIN_FRAMES, H]`` after the prefix), so 1x, 4x and 10x are the
errors of the first, fourth and tenth clip-length stretch of video.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patterns import Pattern, PersistentLocal, SinkWindow, TopK, VideoGeometry
from runtime import (
    CausalWanModel,
    ChunkRunner,
    EagerRunner,
    GlobalCache,
    RollingCache,
    generate,
    reference_runner,
)
from world import metrics
from world.latent import frames_to_latents, latents_to_frames
from world.scenes import TRAIN_FRAMES, SceneBatch, render
from world.scorers import load_world_scorer, recall_table, world_geometry

PREFIX_FRAMES = 3
"""Clean frames given before sampling: the first chunk, which determines the scene."""

REAPPEAR_GAP = 4
"""Frames an object must have been out of sight for its return to count as reappearing."""


@dataclass(frozen=True)
class Contender:
    """One way of running the model: a pattern on the paged runtime, or a dense cache."""

    name: str
    scorer: str | None = None  # "learned", "identity" or None (no scorer involved)
    pattern: Pattern | None = None  # None: an eager dense cache (see `cache_frames`)
    cache_frames: int | None = None  # eager dense cache window; None keeps every frame


def contenders(geometry: VideoGeometry, *, learned: bool) -> list[Contender]:
    """The patterns judged, at stated budgets (KV pages per layer in the comments, for the
    world's 8 pages per frame and a training clip of 18 frames)."""
    ppf = geometry.pages_per_frame
    fpc = geometry.frames_per_chunk
    # 3 sinks + 3 recent frames + the chunk: 6 history frames (48 pages).
    sink_window = SinkWindow(sink_frames=fpc, window_frames=3 * fpc)
    patterns: list[tuple[str, Pattern, bool]] = [
        ("sink_window", sink_window, False),
        # Light Forcing: the dense window's memory, top 25 % of its pages computed.
        ("topk", TopK(density=0.25, window_frames=TRAIN_FRAMES), True),
        # The default: 2 frames of persistent pages, a 9-frame window at 25 % (64 pages).
        (
            "persistent_local",
            PersistentLocal(persistent_blocks=2 * ppf, window_frames=3 * fpc, local_density=0.25),
            True,
        ),
        # The sink window's 48 pages: 3 history frames (24 pages) + 24 persistent pages.
        (
            "persistent_local_budget",
            PersistentLocal(persistent_blocks=3 * ppf, window_frames=2 * fpc, local_density=0.5),
            True,
        ),
    ]
    out = [Contender("dense"), Contender("dense_window", cache_frames=TRAIN_FRAMES)]
    for name, pattern, scored in patterns:
        if not scored:
            out.append(Contender(name, pattern=pattern))
            continue
        if learned:
            out.append(Contender(name, "learned", pattern))
        out.append(Contender(name, "identity", pattern))
    return out


def contender_runner(
    model: CausalWanModel, contender: Contender, geometry: VideoGeometry, scorer_path=None
) -> ChunkRunner:
    """The runner that rolls `model` out as `contender` does: an eager dense cache, or the
    paged runtime of its pattern (a copy of the model) with its scorer (`scorer_path`, None:
    the committed one, when the contender's scorer is "learned")."""
    if contender.pattern is None:
        cache = (
            GlobalCache()
            if contender.cache_frames is None
            else RollingCache(window_frames=contender.cache_frames)
        )
        return EagerRunner(model, cache)
    runner = reference_runner(
        model, contender.pattern, page_size=geometry.page_size, q_block=geometry.q_block
    )
    if contender.scorer == "learned":
        load_world_scorer(runner.runtime, scorer_path)
    return runner


def _window_means(values: Tensor, horizons: Sequence[int]) -> dict[int, float]:
    """values [B, F] over generated frames -> mean over (H - TRAIN_FRAMES, H] per horizon."""
    out = {}
    for h in horizons:
        lo = max(0, h - TRAIN_FRAMES)
        out[h] = float(values[:, lo:h].float().mean())
    return out


def score_continuation(
    prediction: Tensor, scene: SceneBatch, horizons: Sequence[int]
) -> dict[int, dict[str, float | int | None]]:
    """Metrics of generated frames [B, F, 3, H, W] against the scene's frames after the
    prefix, per horizon (counted in generated frames)."""
    truth = scene.frames[:, PREFIX_FRAMES : PREFIX_FRAMES + prediction.shape[1]]
    mse = metrics.mse(prediction, truth)  # [B, F]
    psnr = metrics.psnr(prediction, truth)  # [B, F]
    drift = metrics.stat_drift(prediction, truth)  # [B, F]
    reappear = metrics.reappear_mask(scene, REAPPEAR_GAP)[:, PREFIX_FRAMES:][
        :, : prediction.shape[1]
    ]
    sq = ((prediction - truth) ** 2).mean(2)  # [B, F, H, W]
    mse_h, drift_h = _window_means(mse, horizons), _window_means(drift, horizons)
    psnr_h = _window_means(psnr, horizons)
    out = {}
    for h in horizons:
        lo = max(0, h - TRAIN_FRAMES)
        mask = reappear[:, lo:h]
        pixels = int(mask.sum())
        out[h] = {
            "mse": mse_h[h],
            "psnr": psnr_h[h],
            "reappear_mse": float(sq[:, lo:h][mask].mean()) if pixels else None,
            "reappear_pixels": pixels,
            "stat_drift": drift_h[h],
        }
    return out


def evaluate(
    model: CausalWanModel,
    *,
    seeds: Sequence[int],
    horizons: Sequence[int],
    scorer_path=None,
    device: torch.device | str = "cpu",
    random_model: CausalWanModel | None = None,
    only: Sequence[str] | None = None,
    recall_chunks: int = 4,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run every contender on the held-out `seeds` up to the largest horizon.

    horizons: generated frames after the prefix (multiples of the chunk length). With
    `scorer_path` None only the identity scorer runs. `only` restricts the contenders by
    name (floors included). Returns the records described in the module docstring.
    """
    device = torch.device(device)
    geometry = world_geometry(model, page_size=32)
    fpc = geometry.frames_per_chunk
    if any(h <= 0 or h % fpc for h in horizons):
        raise ValueError(f"horizons must be positive multiples of {fpc} frames, got {horizons}")
    horizons = sorted(horizons)
    total = PREFIX_FRAMES + horizons[-1]
    scene = render(list(seeds), total, device=device)
    latents = frames_to_latents(scene.frames)
    prefix = latents[:, :, :PREFIX_FRAMES]
    cfg = model.config
    context = torch.zeros(len(seeds), cfg.text_len, cfg.text_dim, device=device)
    latent_shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    say = progress or (lambda _msg: None)

    recalls = recall_table(model, seeds, geometry, scorer_path, chunks=recall_chunks, device=device)

    def rollout(runner: ChunkRunner, m: CausalWanModel) -> Tensor:
        out = generate(
            runner,
            context,
            horizons[-1] // fpc,
            latent_shape=latent_shape,
            batch_size=len(seeds),
            seed=0,
            prefix=prefix,
            progress=False,
        )
        return latents_to_frames(out[:, :, -horizons[-1] :].float()).clamp(-1, 1)

    records = []

    def record(name: str, scorer: str | None, prediction: Tensor, seconds: float, kv: int | None):
        rec = recalls.get(scorer) if scorer else None
        for h, values in score_continuation(prediction, scene, horizons).items():
            records.append(
                {
                    "pattern": name,
                    "scorer": scorer,
                    "horizon_frames": h,
                    **values,
                    "recall_25": None if rec is None else rec[0.25],
                    "recall_12": None if rec is None else rec[0.125],
                    "recall_oracle_25": None if rec is None else recalls["oracle"][0.25],
                    "recall_oracle_12": None if rec is None else recalls["oracle"][0.125],
                    "peak_kv_bytes": kv,
                    "seconds": seconds,
                }
            )

    def wanted(name: str) -> bool:
        return only is None or name in only

    if wanted("copy_last"):
        last = scene.frames[:, PREFIX_FRAMES - 1 : PREFIX_FRAMES]
        record("copy_last", None, last.expand(-1, horizons[-1], -1, -1, -1), 0.0, None)
    if random_model is not None and wanted("random_model"):
        say("random_model")
        start = time.perf_counter()
        prediction = rollout(EagerRunner(random_model, GlobalCache()), random_model)
        record("random_model", None, prediction, time.perf_counter() - start, None)
    for contender in contenders(geometry, learned=scorer_path is not None):
        if not wanted(contender.name):
            continue
        label = contender.name + (f" ({contender.scorer})" if contender.scorer else "")
        say(label)
        runner = contender_runner(model, contender, geometry, scorer_path)
        start = time.perf_counter()
        prediction = rollout(runner, model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        record(contender.name, contender.scorer, prediction, seconds, runner.peak_kv_bytes)
    return records


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """One row per contender (per model, for records with a ``model``): mse / reappear_mse
    per horizon side by side (for tables)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("model"), r["pattern"], r["scorer"])
        model = {"model": r["model"]} if "model" in r else {}
        row = rows.setdefault(
            key,
            {**model, "pattern": r["pattern"], "scorer": r["scorer"] or "-", "kv_MiB": None},
        )
        h = r["horizon_frames"]
        row[f"mse@{h}"] = r["mse"]
        row[f"reappear@{h}"] = r["reappear_mse"]
        if r["peak_kv_bytes"] is not None:
            row["kv_MiB"] = r["peak_kv_bytes"] / 2**20
        if r["recall_25"] is not None:
            row["recall_25"] = r["recall_25"]
    return list(rows.values())


def curves(records: Sequence[dict], metric: str) -> list[dict]:
    """Records regrouped per contender as ``{"pattern", "scorer", metric: {horizon: value}}``
    (the form `world.video.plot_error_vs_horizon` draws)."""
    grouped: dict[tuple, dict] = {}
    for r in records:
        key = (r["pattern"], r["scorer"])
        entry = grouped.setdefault(
            key, {"pattern": r["pattern"], "scorer": r["scorer"], metric: {}}
        )
        entry[metric][r["horizon_frames"]] = r[metric]
    return list(grouped.values())


def horizons_for(multiples: Sequence[float]) -> list[int]:
    """Generated-frame horizons for multiples of the training clip, in whole chunks."""
    return [max(3, 3 * math.ceil(m * TRAIN_FRAMES / 3)) for m in multiples]
