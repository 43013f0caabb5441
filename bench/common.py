"""Helpers shared by the benchmarks: device record, timing, JSON output."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from patterns.files import write_text_atomic


def device_record() -> dict:
    """What every benchmark JSON names: card, versions, date."""
    import triton

    cuda = torch.cuda.is_available()
    return dict(
        card=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def sync() -> None:
    """Wait for the GPU (no-op without one): host clocks then measure finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn on the GPU (triton.testing.do_bench, events, warm-up)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def device_time_us(event) -> float:
    """GPU microseconds of a profiler average (`device_time_total`; the older
    `cuda_time_total` on torch versions without it). 0 for an event that ran no kernel."""
    total = getattr(event, "device_time_total", None)
    return float(total if total is not None else event.cuda_time_total)


def cuda_kernels(prof) -> list:
    """The CUDA kernels of a finished `torch.profiler.profile`, as its per-name averages,
    longest total GPU time first."""
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sorted(kernels, key=device_time_us, reverse=True)


def kernel_profile(fn: Callable[[], object], top: int = 8) -> dict:
    """One profiled call of `fn` (after one unprofiled, to warm it): its wall milliseconds,
    the GPU milliseconds of its kernels summed, how many kernels it launched, and the `top`
    kernels by GPU time (name, ms, calls). GPU ms well under wall ms: the call is bound by
    the host (launches, Python), not by its kernels."""
    import time

    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    kernels = cuda_kernels(prof)
    return dict(
        wall_ms=wall * 1e3,
        gpu_ms=sum(device_time_us(e) for e in kernels) / 1e3,
        launches=sum(e.count for e in kernels),
        top=[
            dict(kernel=e.key[:70], ms=device_time_us(e) / 1e3, calls=e.count)
            for e in kernels[:top]
        ],
    )


def write_json(path: str | Path | None, payload: dict) -> None:
    if path is None:
        return
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))
