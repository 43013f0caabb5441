"""`sparsify bench` keeps its own options and runs each benchmark as `python -m bench.<name>`
from the checkout, with `--bench-args` passed through."""

import shlex
import subprocess
import sys

import pytest

from sparsify.commands import args as cli_args
from sparsify.commands import bench


def _parse(argv):
    parser = cli_args.Parser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_own_options_and_passthrough_are_separated(tmp_path):
    args = _parse(["kernel", "--out", str(tmp_path), "--bench-args", "--cases sf5s --sweep"])
    assert (args.which, args.out, shlex.split(args.bench_args)) == (
        "kernel",
        tmp_path,
        ["--cases", "sf5s", "--sweep"],
    )


def test_each_benchmark_runs_as_a_module_with_its_json_path(monkeypatch, tmp_path):
    calls = []

    def fake_run(command, env, check):
        calls.append((command, env["PYTHONPATH"].split(":")[0]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    # the rollout's CPU estimate is the demo's; here the benchmark's own size is not at issue
    monkeypatch.setattr(bench, "_check_cpu_rollout", lambda extra, force: None)
    assert bench.run(_parse(["--out", str(tmp_path), "--bench-args=--horizons 5s"])) == 0
    root = str(bench.checkout())
    for (command, path), name in zip(calls, bench.WHICH, strict=True):
        json_path = str((tmp_path / f"{name}.json").resolve())
        assert command == [sys.executable, "-u", "-m", f"bench.{name}", "--horizons", "5s",
                           "--json", json_path]  # fmt: skip
        assert path == root


def test_without_bench_folder_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "sparsify" / "commands" / "bench.py"))
    with pytest.raises(cli_args.FlagError, match="repository checkout") as err:
        bench.checkout()
    assert err.value.flag == "bench/"
