"""Argument checks shared by patterns and the runtime (the reference model keeps its own:
it imports nothing of this project)."""

from __future__ import annotations


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """`value` if it is an int (not a bool) of at least `minimum`, else a ValueError naming
    `name` and what was expected."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value
