"""The `sparsify` command line as a user meets it, run as a subprocess: every mistyped flag is
one line naming the flag, exit code 2, no traceback, and nothing is done."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "sparsify.cli"]


def _start(argv: list[str], cwd: Path, prefix: list[str] = CLI) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [*prefix, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _run_all(cases: dict[str, list[str]], cwd: Path, prefix: list[str] = CLI) -> dict:
    """Runs the command lines side by side; {name: (returncode, stdout, stderr, seconds)}."""
    started = {
        name: (_start(argv, cwd, prefix), time.perf_counter()) for name, argv in cases.items()
    }
    results = {}
    for name, (proc, start) in started.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err, time.perf_counter() - start)
    return results


def _assert_flag_error(result, command: str, flag: str, *words: str) -> None:
    code, out, err, _ = result
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sparsify {command}: error: {flag}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


PLAN_MISTAKES = {
    "--persistent-blocks": (["--persistent-blocks", "-2"], ">= 0"),
    "--window-frames": (["--window-frames", "0"], ">= 1"),
    "--local-topk": (["--local-topk", "-1"], ">= 1"),
    "--page-size": (["--page-size", "7"], "power of two"),
    "--q-block": (["--q-block", "0"], "power of two"),
    "--backend": (["--backend", "nosuch"], "nosuch"),
    "--num-kv-heads": (["--num-kv-heads", "3"], "divide"),
}


def test_plan_and_autotune_name_the_mistyped_flag(tmp_path):
    cases = {flag: ["plan", *argv] for flag, (argv, _) in PLAN_MISTAKES.items()}
    cases["page 0"] = ["plan", "--page-size", "0"]
    cases["--cases"] = ["autotune", "--cases", "sf5s,nosuch"]
    results = _run_all(cases, tmp_path)
    for flag, (_, word) in PLAN_MISTAKES.items():
        _assert_flag_error(results[flag], "plan", flag, word)
    _assert_flag_error(results["page 0"], "plan", "--page-size", "got 0")
    _assert_flag_error(results["--cases"], "autotune", "--cases", "nosuch", "sf5s", "paper65k")


def test_demo_and_bench_check_their_arguments_before_any_work(tmp_path):
    cases = {
        "tpu": ["demo", "--device", "tpu"],
        "out": ["demo", "--out", "/proc/nope"],
    }
    if not torch.cuda.is_available():
        cases["cuda"] = ["demo", "--device", "cuda"]
        cases["big"] = ["demo", "--preset", "wan2.1-1.3b"]
        cases["bench rollout"] = ["bench", "rollout", "--out", str(tmp_path / "b")]
    results = _run_all(cases, tmp_path)
    _assert_flag_error(results["tpu"], "demo", "--device", "'tpu'")
    _assert_flag_error(results["out"], "demo", "--out", "/proc/nope")
    code, out, err, seconds = results["out"]
    # Refused at parsing: no model built, no rollout, nothing written, no time spent on work.
    assert out == "" and "[demo]" not in err and seconds < 60
    assert not (tmp_path / "sparsify-demo").exists()
    if "cuda" in results:
        _assert_flag_error(results["cuda"], "demo", "--device", "no CUDA device")
        # Hours on a CPU: refused up front with the estimate, --force offered.
        _assert_flag_error(results["big"], "demo", "--preset", "parameter", "estimated", "--force")
        _assert_flag_error(results["bench rollout"], "bench", "--force", "wan2.1-1.3b", "estimated")
        assert not (tmp_path / "b" / "rollout.json").exists()


def test_plan_diffusers_wan_without_diffusers_is_one_line(tmp_path):
    # diffusers made unimportable in the child, as on an install without the extra
    hide = ["-c", "import sys; sys.modules['diffusers'] = None; from sparsify.cli import main; "
            "sys.exit(main())"]  # fmt: skip
    result = _run_all({"d": ["plan", "--diffusers-wan", "tiny"]}, tmp_path, [sys.executable, *hide])
    _assert_flag_error(result["d"], "plan", "--diffusers-wan", "sparse-forcing[diffusers]")


def test_version_help_and_license(tmp_path):
    results = _run_all({"version": ["--version"], "help": ["--help"]}, tmp_path)
    import sparsify
    from sparsify.cli import COMMANDS

    code, out, err, _ = results["version"]
    assert code == 0 and out.strip() == f"sparsify {sparsify.__version__}"
    assert sparsify.__version__[0].isdigit()
    code, out, err, _ = results["help"]
    assert code == 0
    for name, summary in COMMANDS.items():
        lines = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert len(lines) == 1 and summary in lines[0], out
    assert "one subcommand per module" not in out
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


@pytest.mark.parametrize("command", ["demo", "plan", "autotune", "bench", "quality"])
def test_every_option_has_help_and_shows_its_default(command):
    from sparsify.cli import build_parser

    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    text = sub.format_help()
    assert "(default:" in text
    if command == "autotune":
        assert "sf5s" in text and "paper65k" in text


IN_PROCESS = [
    (["plan", "--q-block", "24"], "plan", "--q-block", "power of two"),
    (["plan", "--num-kv-heads", "3"], "plan", "--num-kv-heads", "divide"),  # from WanConfig
    (["plan", "--window-frames", "2"], "plan", "--window-frames", "one chunk"),  # the pattern's
    (["plan", "--pattern", "dense", "--local-topk", "2"], "plan", "--local-topk", "dense"),
    (["plan", "--local-density", "1.5"], "plan", "--local-density", "(0, 1]"),
    (["demo", "--chunks", "0"], "demo", "--chunks", ">= 1"),
    (["bench", "kernel", "--out", "/proc/nope"], "bench", "--out", "/proc/nope"),
]


@pytest.mark.parametrize(("argv", "command", "flag", "word"), IN_PROCESS)
def test_more_mistakes_are_one_line(argv, command, flag, word, capsys):
    from sparsify.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # the parser's own errors
        code = exit_.code
    err = capsys.readouterr().err
    _assert_flag_error((code, "", err, 0.0), command, flag, word)


def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch):
    from sparsify.cli import main
    from sparsify.commands import plan

    def broken(args):
        raise ValueError("a bug, not a flag")

    monkeypatch.setattr(plan, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["plan"])


def test_plan_attn_impl_flex_is_planned(capsys):
    from sparsify.cli import main

    assert main(["plan", "--attn-impl", "flex"]) == 0
    out = capsys.readouterr().out
    assert "4 attention sites: 2 rewritten, 2 kept" in out and " flex " in out
    assert "PersistentLocal(" in out  # the default configuration, as the demo's
