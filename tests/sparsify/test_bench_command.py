"""`sparsify bench` keeps its own options and hands `--bench-args` to the benchmarks."""

import argparse
import shlex

import pytest

from sparsify.commands import bench


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_own_options_and_passthrough_are_separated():
    args = _parse(["kernel", "--out", "results", "--bench-args", "--cases sf5s --sweep"])
    assert (args.which, args.out, shlex.split(args.bench_args)) == (
        "kernel",
        "results",
        ["--cases", "sf5s", "--sweep"],
    )


def test_each_benchmark_gets_its_json_path(monkeypatch, tmp_path):
    calls = {}
    for name in bench.WHICH:
        module = pytest.importorskip(f"bench.{name}")
        monkeypatch.setattr(module, "main", lambda argv, n=name: calls.setdefault(n, argv) and 0)
    assert bench.run(_parse(["--out", str(tmp_path), "--bench-args=--horizons 5s"])) == 0
    assert calls["kernel"] == ["--horizons", "5s", "--json", str(tmp_path / "kernel.json")]
    assert calls["rollout"] == ["--horizons", "5s", "--json", str(tmp_path / "rollout.json")]
