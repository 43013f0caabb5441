"""`sparsify quality --quick` at a reduced size: the JSON schema of bench.quality, the floors."""

import json

import pytest

from sparsify.cli import main

SCHEMA = {
    "pattern",
    "scorer",
    "horizon_frames",
    "mse",
    "psnr",
    "reappear_mse",
    "stat_drift",
    "recall_25",
    "recall_12",
}


def test_quick_writes_every_contender_with_the_floors(tmp_path, capsys):
    path = tmp_path / "q.json"
    code = main(["quality", "--quick", "--seeds", "1", "--frames", "3", "--json", str(path)])
    assert code == 0
    records = json.loads(path.read_text())["records"]
    assert all(set(r) >= SCHEMA for r in records)
    assert {r["horizon_frames"] for r in records} == {3}
    kinds = {(r["pattern"], r["scorer"]) for r in records}
    assert kinds == {
        ("copy_last", None),
        ("random_model", None),
        ("dense", None),
        ("persistent_local", "learned"),
        ("persistent_local", "identity"),
    }
    mse = {(r["pattern"], r["scorer"]): r["mse"] for r in records}
    # The floors bracket the trained model: untrained weights are far worse than copying.
    assert mse[("random_model", None)] > mse[("copy_last", None)] > 0
    assert mse[("dense", None)] < mse[("random_model", None)]
    scored = [r for r in records if r["scorer"]]
    assert all(0 < r["recall_12"] <= r["recall_25"] <= 1 for r in scored)
    out = capsys.readouterr().out
    assert "persistent_local" in out and "dense / copy_last" in out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--quick", "--frames", "4"], "--frames"),
        (["--quick", "--json", "no-such-folder/q.json"], "--json"),
    ],
)
def test_bad_flags_fail_before_any_work(argv, flag, capsys):
    assert main(["quality", *argv]) == 2
    assert flag in capsys.readouterr().err
