"""How long reference-model rollouts take on this CPU, estimated before any is run.

A rollout's work is counted from the model's parameter count (2 FLOPs per parameter per
token) plus its attention (over at most Self-Forcing's 21-frame cache and the text), and
divided by the measured speed of a float32 matmul on this CPU with the current threads.
Real runs are slower still (normalisation, RoPE, cache bookkeeping), so the figure is a
lower bound: the demo and the rollout benchmark print it up front and refuse runs of hours
unless `--force` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sparsify.commands.args import FlagError

REFUSE_SECONDS = 3600.0  # longer than this on a CPU needs --force


@dataclass(frozen=True)
class CpuEstimate:
    """parameters: of the model; chunk_flops: one chunk (every denoising pass and the
    context pass); flops_per_second: this CPU's measured float32 matmul speed."""

    parameters: int
    chunk_flops: float
    flops_per_second: float

    def seconds(self, chunks: int) -> float:
        return chunks * self.chunk_flops / self.flops_per_second


def parameter_count(config) -> int:
    """Parameters of a `runtime.CausalWanModel` built from `config` on the meta device (no
    memory, no compute)."""
    import torch

    from runtime import CausalWanModel

    with torch.device("meta"):
        return sum(p.numel() for p in CausalWanModel(config).parameters())


def chunk_flops(config, parameters: int) -> float:
    """FLOPs of one chunk of a `runtime.WanConfig`: the Self-Forcing schedule's denoising
    passes and its context pass, each over the chunk's tokens."""
    from runtime.eager import SELF_FORCING_WINDOW_FRAMES
    from runtime.rollout import SelfForcingSchedule

    passes = len(SelfForcingSchedule().denoising_steps) + 1
    tokens = config.frames_per_chunk * config.tokens_per_frame
    keys = SELF_FORCING_WINDOW_FRAMES * config.tokens_per_frame + config.text_len
    attention = 4 * config.num_layers * config.dim * tokens * keys  # q·kᵀ and p·v
    return passes * (2 * parameters * tokens + attention)


def matmul_flops_per_second(size: int = 384, repeats: int = 8) -> float:
    """This CPU's float32 matmul speed with torch's current thread count (~0.1 s); the
    fastest of `repeats` calls, as other processes may share the cores."""
    import torch

    a = torch.randn(size, size)
    a @ a  # the first call allocates
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_estimate(config) -> CpuEstimate:
    parameters = parameter_count(config)
    return CpuEstimate(parameters, chunk_flops(config, parameters), matmul_flops_per_second())


def check_cpu_run(config, chunks: int, what: str, *, force: bool, flag: str, advice: str) -> str:
    """A line saying how long `chunks` chunks of `config` (a `runtime.WanConfig`) take on this
    CPU, for `what` (a rollout, a benchmark); a `FlagError` naming `flag` with `advice` when
    that is over REFUSE_SECONDS and `force` is not set."""
    estimate = cpu_estimate(config)
    seconds = estimate.seconds(chunks)
    message = (
        f"{what}: {chunks} chunks of a {estimate.parameters / 1e6:.1f}M-parameter model on this "
        f"CPU, estimated {duration(seconds)} at least"
    )
    if seconds > REFUSE_SECONDS and not force:
        raise FlagError(flag, f"{message}; {advice}, or pass --force")
    return message


def duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
