"""The persisted autotune winners: `autotune.json` in the cache dir, one record per key.

A key is (device name, torch version, triton version, kernel source, kernel structure, shape
bucket): a winner timed on other kernel code (a changed template) is never reused; the
shape bucket is (next power of two of Lq, the table width Kmax rounded up to a power of two
or 1.5 times one): both are known without reading the table on the host, so a lookup never
syncs the device. Every record is validated when the file is read: a bad one (a missing
field, a value no launch accepts) is skipped with one warning naming the file and its key,
and the others are kept.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
import triton

from codegen.cache import atomic_write, cache_dir
from codegen.config import LaunchConfig, spec_for
from codegen.problem import Problem
from codegen.render import module_of, template_fingerprint

# The structure of a call without any tuning choice (the store's key).
_PROBE = LaunchConfig(block_m=16, num_warps=4, num_stages=2)
_FIELDS = tuple(f.name for f in dataclasses.fields(LaunchConfig))
# Fields that records written before they existed lack: those records mean the default.
_ADDED_LATER = ("kv_splits", "fused_dq")

_memory: dict[str, LaunchConfig] | None = None
_hits: dict[tuple, LaunchConfig | None] = {}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def width_bucket(n: int) -> int:
    """The table width's bucket: the next of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two
    and their 1.5 multiples) at or above n. Power-of-two buckets put 6.25 % to 25 % of the
    paper's window (58 to 110 pages) into one record, whose winner is up to 5 % off for the
    lower densities (H100: 128-row tiles win there, 64-row tiles at 25 %)."""
    pow2 = next_pow2(n)
    return pow2 * 3 // 4 if pow2 >= 4 and pow2 * 3 // 4 >= n else pow2


def tuning_key(p: Problem, kernel: str = "fwd") -> str:
    """Identity of a tuning result: device, versions, the generated source's fingerprint,
    kernel structure, shape bucket, and which kernel ("fwd", or the backward's "bwd_dq" /
    "bwd_dkdv", tuned separately).

    Whether the LSE is written is left out: it adds one store per row after the kv loop and
    does not change which tiling wins, so a winner tuned with the LSE serves the runtime's
    calls without it (and the other way round)."""
    base = spec_for(p, _PROBE, return_lse=True)
    device = torch.cuda.get_device_name(p.q.device) if p.q.is_cuda else str(p.q.device)
    # The forward's records keep the key they had before backward kernels existed.
    which = {} if kernel == "fwd" else dict(kernel=kernel)
    return json.dumps(
        dict(
            **which,
            device=device,
            torch=torch.__version__,
            triton=triton.__version__,
            source=template_fingerprint(module_of(kernel))[:16],
            spec=json.loads(base.key()),
            lq=next_pow2(p.q_len),
            kmax=width_bucket(p.max_blocks),
        ),
        sort_keys=True,
    )


def store_path() -> Path:
    return cache_dir() / "autotune.json"


def _read(path: Path) -> dict:
    """The file's records as stored (unvalidated); {} if it is missing or unreadable."""
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"autotune store {path}: unreadable ({err}); ignored", stacklevel=3)
        return {}
    if not isinstance(raw, dict):
        warnings.warn(
            f"autotune store {path}: expected a JSON object of records, got "
            f"{type(raw).__name__}; ignored",
            stacklevel=3,
        )
        return {}
    return raw


def _config(record: object) -> LaunchConfig:
    """The LaunchConfig of one stored record; ValueError/TypeError saying what is wrong."""
    if not isinstance(record, dict):
        raise TypeError(f"expected an object, got {type(record).__name__}")
    missing = [name for name in _FIELDS if name not in record and name not in _ADDED_LATER]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    return LaunchConfig(**{name: record[name] for name in _FIELDS if name in record})


def load() -> dict[str, LaunchConfig]:
    """Every valid record of the store; invalid ones are skipped with one warning."""
    path = store_path()
    configs, bad = {}, []
    for key, record in _read(path).items():
        try:
            configs[key] = _config(record)
        except (TypeError, ValueError) as err:
            bad.append(f"key {key}: {err}")
    if bad:
        warnings.warn(
            f"autotune store {path}: skipped {len(bad)} invalid record(s), kept "
            f"{len(configs)}: " + "; ".join(bad),
            stacklevel=2,
        )
    return configs


def _loaded() -> dict[str, LaunchConfig]:
    global _memory
    if _memory is None:
        _memory = load()
    return _memory


def save(key: str, config: LaunchConfig, ms: float) -> None:
    """Persist `config` as the winner for `key` (merged with what other processes wrote
    meanwhile). A store that cannot be written keeps the winner for this process only."""
    path = store_path()
    records = _read(path)
    records[key] = {**dataclasses.asdict(config), "ms": ms}
    try:
        atomic_write(path, json.dumps(records, indent=1, sort_keys=True))
    except OSError as err:
        warnings.warn(
            f"autotune store {path}: cannot write ({err}); the winner is kept for this "
            "process only",
            stacklevel=2,
        )
        _loaded()[key] = config
    else:
        if _memory is not None:  # else the next lookup reads the new record from disk
            _memory[key] = config
    _hits.clear()


def lookup(p: Problem, kernel: str = "fwd") -> LaunchConfig | None:
    """The persisted winner of `kernel` for this call's key, if any (read from disk once per
    process; memoised per structure and shape bucket, since this runs on every call)."""
    spec = spec_for(p, _PROBE, return_lse=True)
    fast = (kernel, spec, p.q.device, next_pow2(p.q_len), width_bucket(p.max_blocks))
    if fast not in _hits:
        _hits[fast] = _loaded().get(tuning_key(p, kernel))
    return _hits[fast]
