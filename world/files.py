"""Files the world writes: atomically (temp file + rename) and verified when read back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from patterns.files import atomic_path


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)` into a temporary file of the same folder, then
    rename it into place: readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_verified(path: Path, sha256: str) -> bytes:
    """The bytes of `path`, checked against the expected sha256 (ValueError naming it)."""
    data = Path(path).read_bytes()
    if sha256_bytes(data) != sha256:
        raise ValueError(
            f"{path}: sha256 {sha256_bytes(data)} does not match the recorded {sha256} "
            "(the file was modified or truncated)"
        )
    return data
