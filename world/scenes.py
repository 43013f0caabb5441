"""The procedural reference world: small scenes whose continuation is known exactly.

A scene is a static smooth coloured backdrop (the view never moves), 2-4 flat-coloured
objects (discs and squares with anti-aliased edges) and an opaque textured vertical bar
in front of them. Objects move at constant speed and reflect off the walls of a world box
that is ``world_margin`` pixels larger than the view on every side, so they leave the view
and come back; they never interact (fixed draw order, overlap allowed), so nothing is
chaotic. In frames 0-2 (the first chunk) every object is fully inside the view, clear of
the bar and of the other objects, which makes the whole clip a function of the first chunk.

Scene parameters are drawn on the CPU from ``torch.Generator().manual_seed(seed)`` in
float64; rendering is vectorised over the batch, frames and pixels (one loop over the few
objects) in float32 on any device, so CPU and CUDA agree to float tolerance.

Seeds: training draws from ``TRAIN_SEEDS`` = [0, 2**31); ``heldout_seeds(n)`` gives seeds
from 2**31 + 7 upwards, which no training run sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# A training clip: six chunks of 3 frames. Evaluation horizons are 1x, 4x and 10x of it.
TRAIN_FRAMES = 18
TRAIN_SEEDS = range(0, 2**31)
_HELDOUT_START = 2**31 + 7
_MAX_SEED = 2**63 - 1


def heldout_seeds(n: int) -> list[int]:
    """``n`` seeds outside ``TRAIN_SEEDS`` (2**31 + 7, 2**31 + 8, ...), the same on every call."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"heldout_seeds: n must be a non-negative int, got {n!r}")
    return [_HELDOUT_START + i for i in range(n)]


@dataclass(frozen=True)
class WorldConfig:
    """Scene parameters; lengths are in pixels of the rendered frame."""

    height: int = 64
    width: int = 64
    min_objects: int = 2
    max_objects: int = 4
    # Disc radius / square half-side.
    size_range: tuple[float, float] = (3.5, 5.5)
    speed_range: tuple[float, float] = (0.7, 2.5)
    # Directions within this angle of the horizontal, so objects cross the vertical bar.
    max_angle_deg: float = 50.0
    # The world box extends this far beyond the view on every side (must exceed an
    # object's width, so objects can leave the view entirely).
    world_margin: float = 16.0
    occluder_width: float = 14.0
    # Bar centre, as a fraction of the width (drawn uniformly per scene, fixed in time).
    occluder_center_range: tuple[float, float] = (0.35, 0.65)
    # Clearance (px) of every object from the view edges, the bar and the other objects
    # in frames 0-2.
    start_clearance: float = 1.0
    # Placement draws per object; an object that finds no free place is left out.
    placement_tries: int = 32
    # An object counts as visible when it covers at least this many pixels.
    min_visible_pixels: int = 4
    backdrop_waves: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_range"):
                lo, hi = value
                if not (0 <= lo <= hi):
                    raise ValueError(
                        f"WorldConfig.{f.name} must be (lo, hi), 0 <= lo <= hi; got {value}"
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(
                    f"WorldConfig.{f.name} must be a non-negative number, got {value!r}"
                )
        if self.height < 8 or self.width < 8:
            raise ValueError(
                f"WorldConfig: frames must be at least 8x8, got {self.height}x{self.width}"
            )
        if not (1 <= self.min_objects <= self.max_objects):
            raise ValueError(
                "WorldConfig: need 1 <= min_objects <= max_objects, got "
                f"{self.min_objects}, {self.max_objects}"
            )
        if self.size_range[0] <= 0 or self.speed_range[0] <= 0:
            raise ValueError("WorldConfig: size_range and speed_range must be positive")
        if self.world_margin <= 2 * self.size_range[1]:
            raise ValueError(
                f"WorldConfig.world_margin={self.world_margin} must exceed the widest object "
                f"({2 * self.size_range[1]} px) so objects can leave the view"
            )
        if self.occluder_center_range[1] > 1:
            raise ValueError("WorldConfig.occluder_center_range is a fraction of the width (<= 1)")
        if self.max_angle_deg >= 90:
            raise ValueError(
                "WorldConfig.max_angle_deg must be below 90 (objects must move sideways)"
            )


DEFAULT_WORLD = WorldConfig()


@dataclass
class SceneBatch:
    """A batch of rendered clips and their ground truth.

    ``N`` is ``config.max_objects``; slots beyond a scene's object count are absent
    (``present`` false, masks empty).
    """

    frames: Tensor  # float32 [B, F, 3, H, W] in [-1, 1]
    object_masks: Tensor  # bool [B, F, N, H, W]: object n visible there (after occlusion)
    visible: Tensor  # bool [B, F, N]: object n covers >= min_visible_pixels
    centers: Tensor  # float32 [B, F, N, 2]: (x, y) centre in pixels (pixel i spans [i, i+1))
    present: Tensor  # bool [B, N]
    occluder: Tensor  # bool [B, H, W]: pixels of the bar


@dataclass
class SceneParams:
    """Per-scene parameters (float64 on the CPU), ``N = config.max_objects``."""

    present: Tensor  # bool [B, N]
    is_disc: Tensor  # bool [B, N]
    size: Tensor  # [B, N] disc radius / square half-side
    start: Tensor  # [B, N, 2] centre (x, y) at frame 0
    velocity: Tensor  # [B, N, 2] px per frame
    color: Tensor  # [B, N, 3] in [-1, 1]
    occluder_x: Tensor  # [B] bar centre
    occluder_color: Tensor  # [B, 3]
    occluder_phase: Tensor  # [B] texture phase
    backdrop_base: Tensor  # [B, 3]
    backdrop_freq: Tensor  # [B, 3, K, 2] cycles per view along (x, y)
    backdrop_phase: Tensor  # [B, 3, K]
    backdrop_amp: Tensor  # [B, 3, K]


def _hsv_to_rgb(h: float, s: float, v: float) -> list[float]:
    k = [(n + h * 6) % 6 for n in (5, 3, 1)]
    return [v - v * s * max(0.0, min(x, 4 - x, 1.0)) for x in k]


def _start_intervals(lo: float, hi: float, blocked: tuple[float, float] | None, travel: float):
    """Intervals of start coordinates c with c and c + travel in [lo, hi] minus ``blocked``."""
    parts = [(lo, hi)] if blocked is None else [(lo, blocked[0]), (blocked[1], hi)]
    out = []
    for a, b in parts:
        a, b = max(a, a - travel), min(b, b - travel)
        if b > a:
            out.append((a, b))
    return out


def _pick(intervals: list[tuple[float, float]], u: float) -> float:
    """The point at fraction ``u`` of the intervals' total length."""
    total = sum(b - a for a, b in intervals)
    t = u * total
    for a, b in intervals:
        if t <= b - a:
            return a + t
        t -= b - a
    return intervals[-1][1]


def _draw_scene(seed: int, cfg: WorldConfig) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)

    def uniform(k: int) -> list[float]:
        return torch.rand(k, generator=g, dtype=torch.float64).tolist()

    W, H, N, K = cfg.width, cfg.height, cfg.max_objects, cfg.backdrop_waves
    (u_count, u_occ, u_hue, *u_occ_tex) = uniform(7)
    count = cfg.min_objects + min(int(u_count * (N - cfg.min_objects + 1)), N - cfg.min_objects)
    occ_lo, occ_hi = cfg.occluder_center_range
    occ_x = W * (occ_lo + (occ_hi - occ_lo) * u_occ)
    # A muted grey-brown bar with horizontal stripes: textured, unlike any object.
    shade = -0.35 + 0.3 * u_occ_tex[0]
    occ_color = [shade + 0.12, shade, shade - 0.1 + 0.1 * u_occ_tex[1]]
    occ_phase = 2 * math.pi * u_occ_tex[2]

    bd = uniform(3 + 3 * K * 4)
    base = [-0.55 + 0.35 * x for x in bd[:3]]
    waves = torch.tensor(bd[3:], dtype=torch.float64).view(3, K, 4)
    freq = 0.4 + 1.4 * waves[..., :2]  # low frequencies: a smooth backdrop
    phase = 2 * math.pi * waves[..., 2]
    amp = 0.35 * waves[..., 3] / K

    objs: list[dict] = []
    for i in range(N):
        u_shape, u_size, u_speed, u_angle, u_sx, u_sy, u_jit, u_sat = uniform(8)
        cands = uniform(2 * cfg.placement_tries)
        if i >= count:
            continue
        size = cfg.size_range[0] + (cfg.size_range[1] - cfg.size_range[0]) * u_size
        is_disc = u_shape < 0.5
        radius = size if is_disc else size * math.sqrt(2)
        speed = cfg.speed_range[0] + (cfg.speed_range[1] - cfg.speed_range[0]) * u_speed
        angle = math.radians(cfg.max_angle_deg) * (2 * u_angle - 1)
        vx = speed * math.cos(angle) * (1 if u_sx < 0.5 else -1)
        vy = speed * math.sin(angle) * (1 if u_sy < 0.5 else -1)
        pad = radius + cfg.start_clearance
        bar = (occ_x - cfg.occluder_width / 2 - pad, occ_x + cfg.occluder_width / 2 + pad)
        xs = _start_intervals(pad, W - pad, bar, 2 * vx)
        ys = _start_intervals(pad, H - pad, None, 2 * vy)
        if not xs or not ys:
            raise ValueError(
                f"WorldConfig leaves no room for an object of radius {radius:.2f} in frames 0-2 "
                f"(view {W}x{H}, bar width {cfg.occluder_width}); make objects smaller"
            )
        for t in range(cfg.placement_tries):
            x0, y0 = _pick(xs, cands[2 * t]), _pick(ys, cands[2 * t + 1])
            if all(
                math.hypot(x0 - o["x"] + f * (vx - o["vx"]), y0 - o["y"] + f * (vy - o["vy"]))
                > radius + o["radius"] + cfg.start_clearance
                for o in objs
                for f in range(3)
            ):
                hue = (u_hue + len(objs) / N + 0.08 * (u_jit - 0.5)) % 1.0
                rgb = _hsv_to_rgb(hue, 0.75 + 0.25 * u_sat, 1.0)
                objs.append(
                    dict(
                        x=x0,
                        y=y0,
                        vx=vx,
                        vy=vy,
                        size=size,
                        radius=radius,
                        disc=is_disc,
                        color=[2 * c - 1 for c in rgb],
                    )  # fmt: skip
                )
                break
    return dict(objs=objs, occ_x=occ_x, occ_color=occ_color, occ_phase=occ_phase,
                base=base, freq=freq, phase=phase, amp=amp)  # fmt: skip


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s <= _MAX_SEED):
            raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
    return seeds


def draw_params(seeds: Sequence[int], config: WorldConfig = DEFAULT_WORLD) -> SceneParams:
    """Draw every scene's parameters on the CPU (float64), one generator per seed."""
    seeds = _check_seeds(seeds)
    B, N, f64 = len(seeds), config.max_objects, torch.float64
    scenes = [_draw_scene(s, config) for s in seeds]
    p = SceneParams(
        present=torch.zeros(B, N, dtype=torch.bool),
        is_disc=torch.zeros(B, N, dtype=torch.bool),
        size=torch.ones(B, N, dtype=f64),
        start=torch.zeros(B, N, 2, dtype=f64),
        velocity=torch.zeros(B, N, 2, dtype=f64),
        color=torch.zeros(B, N, 3, dtype=f64),
        occluder_x=torch.tensor([s["occ_x"] for s in scenes], dtype=f64),
        occluder_color=torch.tensor([s["occ_color"] for s in scenes], dtype=f64),
        occluder_phase=torch.tensor([s["occ_phase"] for s in scenes], dtype=f64),
        backdrop_base=torch.tensor([s["base"] for s in scenes], dtype=f64),
        backdrop_freq=torch.stack([s["freq"] for s in scenes]),
        backdrop_phase=torch.stack([s["phase"] for s in scenes]),
        backdrop_amp=torch.stack([s["amp"] for s in scenes]),
    )
    for b, s in enumerate(scenes):
        for n, o in enumerate(s["objs"]):
            p.present[b, n] = True
            p.is_disc[b, n] = o["disc"]
            p.size[b, n] = o["size"]
            p.start[b, n] = torch.tensor([o["x"], o["y"]], dtype=f64)
            p.velocity[b, n] = torch.tensor([o["vx"], o["vy"]], dtype=f64)
            p.color[b, n] = torch.tensor(o["color"], dtype=f64)
    return p


def object_centers(
    params: SceneParams, num_frames: int, config: WorldConfig = DEFAULT_WORLD
) -> Tensor:
    """Centres [B, F, N, 2] (float64): straight motion folded by reflection off the box walls.

    The box is the view grown by ``world_margin``; an object reflects when its edge (its
    size) touches a wall, so its centre stays in [-margin + size, extent + margin - size].
    """
    t = torch.arange(num_frames, dtype=torch.float64)[None, :, None, None]
    extent = torch.tensor([config.width, config.height], dtype=torch.float64)
    lo = -config.world_margin + params.size[:, None, :, None]
    span = extent + 2 * config.world_margin - 2 * params.size[:, None, :, None]
    # Unfold the reflections: position along a line of period 2*span, then fold (triangle wave).
    u = torch.remainder(params.start[:, None] - lo + params.velocity[:, None] * t, 2 * span)
    return lo + span - (u - span).abs()


def _grid(config: WorldConfig, device, dtype) -> tuple[Tensor, Tensor]:
    # Pixel centres; pixel i covers [i, i + 1).
    xs = torch.arange(config.width, device=device, dtype=dtype) + 0.5
    ys = torch.arange(config.height, device=device, dtype=dtype) + 0.5
    return xs, ys


def _coverage(sdf: Tensor) -> Tensor:
    # One-pixel linear ramp across the edge: an anti-aliased boundary.
    return (0.5 - sdf).clamp(0.0, 1.0)


def render_params(
    params: SceneParams,
    num_frames: int,
    config: WorldConfig = DEFAULT_WORLD,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> SceneBatch:
    """Render drawn parameters (``render`` is ``draw_params`` then this); ``dtype`` is for tests."""
    B, N = params.present.shape
    F, H, W = num_frames, config.height, config.width
    cast = dict(device=device, dtype=dtype)
    xs, ys = _grid(config, device, dtype)
    two_pi = 2 * math.pi

    # Backdrop [B, 3, H, W]: a base colour plus a few low-frequency plane waves.
    fx = params.backdrop_freq[..., 0].to(**cast)[..., None, None] / W
    fy = params.backdrop_freq[..., 1].to(**cast)[..., None, None] / H
    arg = two_pi * (fx * xs + fy * ys[:, None]) + params.backdrop_phase.to(**cast)[..., None, None]
    backdrop = params.backdrop_base.to(**cast)[..., None, None] + (
        params.backdrop_amp.to(**cast)[..., None, None] * torch.sin(arg)
    ).sum(2)
    frames = backdrop[:, None].expand(B, F, 3, H, W).clone()

    centers64 = object_centers(params, F, config)
    centers = centers64.to(**cast)
    size = params.size.to(**cast)
    alphas = []
    for n in range(N):
        dx = xs - centers[:, :, n, 0, None, None]  # [B, F, 1, W]
        dy = ys[:, None] - centers[:, :, n, 1, None, None]  # [B, F, H, 1]
        s = size[:, n, None, None, None]
        disc = torch.sqrt(dx * dx + dy * dy) - s
        square = torch.maximum(dx.abs(), dy.abs()) - s
        sdf = torch.where(params.is_disc[:, n].to(device)[:, None, None, None], disc, square)
        alpha = _coverage(sdf) * params.present[:, n].to(**cast)[:, None, None, None]
        color = params.color[:, n].to(**cast)[:, None, :, None, None]
        frames = frames + alpha[:, :, None] * (color - frames)
        alphas.append(alpha)

    # The bar: full height, fixed in time, horizontal stripes with a per-scene phase.
    occ_x = params.occluder_x.to(**cast)[:, None, None]
    occ_alpha = _coverage((xs - occ_x).abs() - config.occluder_width / 2)  # [B, 1, W]
    stripes = torch.sin(two_pi * ys / 6.0 + params.occluder_phase.to(**cast)[:, None])  # [B, H]
    occ_tex = params.occluder_color.to(**cast)[:, :, None, None] + 0.12 * stripes[:, None, :, None]
    frames = frames + occ_alpha[:, None, None] * (occ_tex[:, None] - frames)

    # What each object contributes to the final pixel: its alpha times the transmittance of
    # everything drawn above it.
    masks = [None] * N
    transmit = (1 - occ_alpha)[:, None]  # [B, 1, 1, W]
    for n in reversed(range(N)):
        masks[n] = alphas[n] * transmit > 0.5
        transmit = transmit * (1 - alphas[n])
    object_masks = torch.stack(masks, dim=2) if N else torch.zeros(B, F, 0, H, W, dtype=torch.bool)
    visible = object_masks.flatten(3).sum(-1) >= config.min_visible_pixels
    return SceneBatch(
        frames=frames.clamp(-1.0, 1.0),
        object_masks=object_masks,
        visible=visible,
        centers=centers,
        present=params.present.to(device),
        occluder=(occ_alpha > 0.5).expand(B, H, W).contiguous(),
    )


def render(
    seeds: Sequence[int],
    num_frames: int,
    *,
    config: WorldConfig = DEFAULT_WORLD,
    device=None,
) -> SceneBatch:
    """Render one clip of ``num_frames`` frames per seed: frames [B, F, 3, H, W] in [-1, 1]."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"render: num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(config, WorldConfig):
        raise TypeError(f"render: config must be a WorldConfig, got {type(config).__name__}")
    return render_params(draw_params(seeds, config), num_frames, config, device=device)
