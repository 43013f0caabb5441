"""Atomic output files: a failed write never leaves a half-written file in place."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from patterns import plot_block_mask
from patterns.files import atomic_path, write_text_atomic


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == target.parent
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_a_plot_that_fails_midway_leaves_the_previous_png(tmp_path, monkeypatch):
    path = tmp_path / "mask.png"
    visible = torch.rand(4, 6) > 0.5
    plot_block_mask(visible, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG truncated")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        plot_block_mask(visible, path)
    assert path.read_bytes() == before
