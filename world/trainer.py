"""The teacher-forcing training loop of the world model: data on the fly, AdamW, EMA, checkpoints.

Everything random in step s is a pure function of (recipe.seed, s): the clip seeds are drawn
from a CPU generator seeded with a hash of both, the noise and the noise levels from a
device generator reseeded the same way. With the model, EMA, optimizer and scheduler state
in the checkpoint, a resumed run therefore continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patterns import Dense, Pattern, VideoGeometry
from runtime import StatefulRunner, generate
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig
from world.checkpoint import load_checkpoint, save_checkpoint
from world.files import atomic_write, atomic_write_bytes
from world.latent import frames_to_latents
from world.quality import Contender, contender_runner, contenders, world_geometry
from world.scenes import TRAIN_SEEDS, WorldConfig, heldout_seeds, render
from world.scorers import load_world_scorer, scorer_host
from world.teacher_forcing import TeacherForcing, flow_matching_loss, sample_sigmas

EVAL_NOISE_SEED = 20_240_601  # fixed noise and noise levels of the held-out eval


@dataclass(frozen=True)
class TrainPreset:
    """What is trained on what: the model, the world, the clip length."""

    model: WanConfig
    world: WorldConfig
    clip_frames: int


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the numbers of a run (fixed at its start, kept on resume)."""

    preset: str
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_clips: int = 64
    pattern: str = "dense"  # the attention trained with: "dense" or a quality contender's
    scorer: str = "identity"  # the pattern's block scorer: "identity" or "learned" (frozen)
    clip_frames: int | None = None  # None: the preset's
    # What the noisy chunks attend to: the clip ("teacher"), or, after its first chunk, the
    # model's own rollout of it with the same attention ("self", Self-Forcing's point:
    # train on the history inference will have)
    context: str = "teacher"


SCORERS = ("identity", "learned")
CONTEXTS = ("teacher", "self")


def training_contender(name: str, geometry: VideoGeometry, scorer: str) -> Contender:
    """The quality contender called `name` (`world.quality.contenders`) scored by `scorer`
    where it scores blocks ("dense": the dense cache holding every frame)."""
    if name == "dense":
        return Contender("dense")
    named = {c.name: c for c in contenders(geometry, learned=False)}
    if name not in named:
        raise ValueError(f"--pattern must be one of {sorted(named)}, got {name!r}")
    c = named[name]
    return dataclasses.replace(c, scorer=scorer) if c.scorer is not None else c


def training_pattern(name: str, geometry: VideoGeometry) -> Pattern | None:
    """The pattern of the quality contender called `name` (`world.quality.contenders`), or
    None for "dense" (the dense teacher-forcing pass)."""
    if name == "dense":
        return None
    c = training_contender(name, geometry, "identity")
    return c.pattern if c.pattern is not None else Dense(window_frames=c.cache_frames)


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (hash-mixed: nearby inputs give
    unrelated generator streams)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_seeds(data_seed: int, step: int, batch: int) -> list[int]:
    """The training scene seeds of `step` (inside `TRAIN_SEEDS`)."""
    generator = torch.Generator().manual_seed(mixed_seed(data_seed, step, 0))
    seeds = torch.randint(TRAIN_SEEDS.start, TRAIN_SEEDS.stop, (batch,), generator=generator)
    return seeds.tolist()


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Model, EMA copy, optimizer and schedule of one training run on `device`."""

    def __init__(
        self,
        recipe: Recipe,
        preset: TrainPreset,
        device,
        *,
        compile: bool = False,
        attention_backend: str = "auto",
    ):
        """`attention_backend`: the `codegen.pbsa_attention` backend of a sparse pattern
        ("auto": triton on CUDA, which needs its differentiable form; "torch": autograd
        through the gather-based reference)."""
        self.recipe, self.preset = recipe, preset
        self.device = torch.device(device)
        config = dataclasses.replace(preset.model, seed=recipe.seed)
        self.model = CausalWanModel(config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.clip_frames = recipe.clip_frames or preset.clip_frames
        self.teacher, self.ema_teacher = (
            self._teacher(m, attention_backend) for m in (self.model, self.ema)
        )
        self.forward = torch.compile(self.teacher) if compile else self.teacher
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=cuda
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, recipe.warmup, recipe.steps)
        )
        self.generator = torch.Generator(self.device)
        self.step = 0
        self.records: list[dict] = []  # the loss log
        self.pending = (0.0, 0)  # (sum, count) of train losses since the last log record
        self.commands: list[str] = []
        self.card = torch.cuda.get_device_name(self.device) if cuda else "cpu"
        self.context = torch.zeros(recipe.batch, 1, config.text_dim, device=self.device)
        self._eval_batches: list[tuple[Tensor, Tensor, Tensor]] | None = None
        if recipe.context not in CONTEXTS:
            raise ValueError(f"--context must be one of {CONTEXTS}, got {recipe.context!r}")
        self._rollout: tuple | None = None  # (runner, its parameters, the model's), once built

    def _teacher(self, model: CausalWanModel, backend: str) -> TeacherForcing:
        """The teacher-forcing pass of `model` with the recipe's attention."""
        r = self.recipe
        geometry = world_geometry(model)
        pattern = training_pattern(r.pattern, geometry)
        if r.scorer not in SCORERS:
            raise ValueError(f"--scorer must be one of {SCORERS}, got {r.scorer!r}")
        if pattern is None:
            return TeacherForcing(model, self.clip_frames, device=self.device)
        scorers = None
        if r.scorer == "learned":
            host = scorer_host(model, geometry)
            load_world_scorer(host)
            scorers = [s.scorer.requires_grad_(False).to(self.device) for s in host.states]
        return TeacherForcing(
            model,
            self.clip_frames,
            device=self.device,
            pattern=pattern,
            geometry=geometry,
            scorers=scorers,
            backend=backend,
        )

    def init_from(self, folder: Path) -> str:
        """Copy verified exported weights into the model and its EMA (before step 0); returns
        the line the run's command log records for it."""
        from world.files import read_json
        from world.weights import MANIFEST_FILE, load_world_model

        if self.step:
            raise RuntimeError("init_from: the run has already trained")
        source = load_world_model(folder, device=self.device)
        if dataclasses.replace(source.config, seed=0) != dataclasses.replace(
            self.model.config, seed=0
        ):
            raise ValueError(f"--init-from {folder}: its config differs from the preset's")
        state = source.state_dict()
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        manifest = read_json(Path(folder) / MANIFEST_FILE)
        return (
            f"# init from {manifest['sha256'][:12]} ({manifest['steps']} steps: "
            f"{' && '.join(manifest['command'])})"
        )

    # -- data -----------------------------------------------------------------------------

    def _clips(self, seeds: list[int]) -> Tensor:
        frames = render(
            seeds, self.clip_frames, config=self.preset.world, device=self.device
        ).frames
        return frames_to_latents(frames)  # [B, 12, F, h, w]

    def _noise(self, clean: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        self.generator.manual_seed(seed)
        noise = torch.randn(clean.shape, generator=self.generator, device=self.device)
        chunks = self.clip_frames // self.model.config.frames_per_chunk
        return noise, sample_sigmas(clean.shape[0], chunks, generator=self.generator)

    def _autocast(self):
        return torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")

    def _rollout_runner(self):
        """(runner, its parameters, the model's matching ones): the recipe's attention at
        inference (`world.quality.contender_runner`) on another model, bf16 on CUDA as
        the quality benchmark runs it. Built once; `_self_history` refreshes its weights."""
        if self._rollout is None:
            r, geometry = self.recipe, world_geometry(self.model)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            # A fresh model, not a copy: the teacher swapped this one's attention spelling.
            fresh = CausalWanModel(self.model.config).to(self.device, dtype)
            fresh.load_state_dict(self.model.state_dict())
            contender = training_contender(r.pattern, geometry, r.scorer)
            runner = contender_runner(fresh.requires_grad_(False).eval(), contender, geometry)
            # The model the runner runs: the dense runner's, or the paged runner's bound copy
            # (whose runtime parameters, the block scorers, have no counterpart here).
            held = runner.chunk_fn if isinstance(runner, StatefulRunner) else runner.model
            theirs = dict(held.named_parameters())
            pairs = [(theirs[n], p) for n, p in self.model.named_parameters()]
            self._rollout = (runner, *map(list, zip(*pairs, strict=True)))
        return self._rollout

    @torch.no_grad()
    def _self_history(self, clean: Tensor, seed: int) -> Tensor:
        """`clean`'s history as the model would have generated it (`Recipe.context` "self"):
        its first chunk, which sets the scene, then each later chunk sampled by the current
        weights (the runtime's 4-step sampler, the noise a pure function of `seed`). The
        last chunk stays the clip's: no noisy chunk attends to it, so it is not sampled."""
        fpc = self.model.config.frames_per_chunk
        sampled = self.clip_frames // fpc - 2
        if sampled < 1:
            return clean
        runner, theirs, ours = self._rollout_runner()
        torch._foreach_copy_(theirs, ours)
        dtype = theirs[0].dtype
        video = generate(
            runner,
            self.context[:1].to(dtype),
            sampled,
            latent_shape=tuple(clean.shape[i] for i in (1, 3, 4)),
            batch_size=clean.shape[0],
            seed=seed,
            progress=False,
            prefix=clean[:, :, :fpc].to(dtype),
        )
        return torch.cat([video.to(clean.dtype), clean[:, :, -fpc:]], dim=2)

    # -- steps ----------------------------------------------------------------------------

    def train_step(self) -> Tensor:
        """One optimizer step on the batch of `self.step`; returns the loss (no host sync)."""
        r = self.recipe
        clean = self._clips(step_seeds(r.seed, self.step, r.batch))
        noise, sigma = self._noise(clean, mixed_seed(r.seed, self.step, 1))
        history = None
        if r.context == "self":
            history = self._self_history(clean, mixed_seed(r.seed, self.step, 2))
        with self._autocast():
            loss = flow_matching_loss(self.forward, clean, noise, sigma, self.context, history)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        # EMA with a short warmup of its decay, so early evals of the EMA are meaningful.
        decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
        ema, params = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema, params, 1.0 - decay)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss of the model and of its EMA: fixed held-out clips, noise, levels."""
        if self._eval_batches is None:
            seeds = heldout_seeds(self.recipe.eval_clips)
            self._eval_batches = []
            for i in range(0, len(seeds), self.recipe.batch):
                clean = self._clips(seeds[i : i + self.recipe.batch])
                self._eval_batches.append((clean, *self._noise(clean, EVAL_NOISE_SEED + i)))
        out = {}
        for name, teacher in (("eval_loss", self.teacher), ("eval_loss_ema", self.ema_teacher)):
            total = torch.zeros((), device=self.device)
            for clean, noise, sigma in self._eval_batches:
                context = self.context[:1].expand(clean.shape[0], -1, -1)
                with self._autocast():
                    total += flow_matching_loss(teacher, clean, noise, sigma, context) * len(clean)
            out[name] = total.item() / self.recipe.eval_clips
        return out

    # -- the loop -------------------------------------------------------------------------

    def run(
        self,
        out: Path,
        *,
        time_budget: float | None = None,
        stop_after: int | None = None,
        progress: bool = True,
    ) -> str:
        """Train until `recipe.steps`, the time budget (seconds) or `stop_after` steps of
        this call; checkpoint on the way and at the end. Returns why it stopped: "done",
        "time budget" or "stop-after"."""
        r, started, first = self.recipe, time.monotonic(), self.step
        if self.step == 0 and not self.records:
            self.records.append({"step": 0, **self.evaluate()})
        # Summed on the device (no sync), in float64: float32 losses of similar size add
        # exactly, so a sum split by a resume equals the uninterrupted one.
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count, t_log, reported = 0, time.monotonic(), False
        bar = tqdm(total=r.steps, initial=self.step, unit="step", disable=not progress)
        reason = "done" if self.step >= r.steps else ""
        while not reason:
            loss_sum += self.train_step()
            count += 1
            bar.update(1)
            if not reported and self.step - first == 20:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                rate = 20 / (time.monotonic() - started)
                bar.write(f"{rate:.2f} steps/s over the first 20 steps (compile included)")
                reported = True
            if self.step >= r.steps:
                reason = "done"
            elif stop_after is not None and self.step - first >= stop_after:
                reason = "stop-after"
            elif time_budget is not None and time.monotonic() - started >= time_budget:
                reason = "time budget"
            if self.step % r.log_every == 0 or reason:
                # The one host sync of a log interval; a partial interval is carried in the
                # checkpoint so that a resumed run logs the same numbers.
                self.pending = (self.pending[0] + loss_sum.item(), self.pending[1] + count)
                loss_sum.zero_()
                count = 0
            if self.step % r.log_every == 0:
                t_log = self._log(t_log, bar)
            if self.step % r.eval_every == 0:
                self.records.append({"step": self.step, **self.evaluate()})
            if self.step % r.checkpoint_every == 0 or reason:
                self.save(out)
        bar.close()
        return reason

    def _log(self, since: float, bar: tqdm) -> float:
        """Append the train-loss record of the interval ending now; returns the time."""
        now = time.monotonic()
        total, n = self.pending
        record = {"step": self.step, "loss": total / n, "lr": self.scheduler.get_last_lr()[0]}
        record["steps_per_s"] = n / max(now - since, 1e-9)
        self.records.append(record)
        self.pending = (0.0, 0)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"training loss is {record['loss']} at step {self.step}")
        return now

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, out: Path) -> None:
        """Checkpoint to `out/checkpoint`, then the loss log and curve next to it."""
        out = Path(out)
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        optimizer = self.optimizer.state_dict()
        for index, state in optimizer["state"].items():
            tensors.update({f"optimizer/{index}/{k}": v for k, v in state.items()})
        meta = {
            "recipe": dataclasses.asdict(self.recipe),
            "model_config": dataclasses.asdict(self.model.config),
            "param_groups": optimizer["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "records": self.records,
            "pending": list(self.pending),
            "commands": self.commands,
            "card": self.card,
            "versions": _versions(),
        }
        save_checkpoint(out / "checkpoint", self.step, tensors, meta)
        lines = "".join(json.dumps(record) + "\n" for record in self.records)
        atomic_write_bytes(out / "loss_log.jsonl", lines.encode())
        atomic_write(out / "loss_curve.png", lambda f: f.write(loss_curve_png(self.records)))

    def load(self, folder: Path) -> None:
        """Restore the state saved by `save` in `folder` (a run's `out/checkpoint`)."""
        step, tensors, meta = load_checkpoint(folder)
        try:  # fields added since keep their defaults in older checkpoints
            saved = Recipe(**meta.get("recipe", {}))
        except TypeError:
            saved = None
        if saved != self.recipe:
            raise ValueError(f"{folder}: the checkpoint was made by another recipe")

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model/"), strict=True)
        self.ema.load_state_dict(part("ema/"), strict=True)
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in part("optimizer/").items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [dict(g, betas=tuple(g["betas"])) for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.records = step, meta["records"]
        self.pending = (float(meta["pending"][0]), int(meta["pending"][1]))
        self.commands, self.card = list(meta["commands"]), meta["card"]


def _versions() -> dict[str, str]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version}


def loss_curve_png(records: list[dict]) -> bytes:
    """The loss curve (train loss per log interval, held-out losses) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o-"), ("eval_loss_ema", "s-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
