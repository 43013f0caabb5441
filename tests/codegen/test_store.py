"""The persisted autotune winners: keys, shape buckets, and validation of what is read back."""

import dataclasses
import json
import warnings

import pytest
import torch

import codegen.store as store
from codegen.config import LaunchConfig
from codegen.samples import sample_problem, small_inputs


def problem(q_len: int, num_pages: int = 4, **kw):
    return sample_problem(small_inputs(q_len=q_len, q_block=32, num_pages=num_pages, **kw))


def new_process(monkeypatch) -> None:
    """Forget what this process read from the store."""
    monkeypatch.setattr(store, "_memory", None)
    monkeypatch.setattr(store, "_hits", {})


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path))
    new_process(monkeypatch)
    return tmp_path / "autotune.json"


WINNER = LaunchConfig(block_m=32, num_warps=4, num_stages=3, tma=True, block_n=16)


def test_winner_is_persisted_and_found_for_the_same_bucket_only(fresh_store, monkeypatch):
    p = problem(100)
    store.save(store.tuning_key(p), WINNER, 0.5)
    assert fresh_store.exists()
    new_process(monkeypatch)
    assert store.lookup(p) == WINNER
    assert store.lookup(problem(120)) == WINNER  # same power-of-two bucket of Lq
    assert store.lookup(problem(300)) is None  # another bucket
    assert store.lookup(problem(100, dtype=torch.float16)) is None  # another structure


def test_key_names_device_versions_source_and_structure():
    key = store.tuning_key(problem(100))
    for field in ('"device"', '"torch"', '"triton"', '"source"', '"spec"', '"lq": 128', '"kmax"'):
        assert field in key


def test_a_changed_kernel_source_gets_other_keys(monkeypatch):
    # winners timed on other kernel code are not evidence for this one
    p = problem(100)
    before = {k: store.tuning_key(p, k) for k in ("fwd", "bwd_dq")}
    monkeypatch.setattr(store, "template_fingerprint", lambda module: module * 16)
    for kernel, key in before.items():
        assert store.tuning_key(p, kernel) != key


def test_width_buckets_are_tight_and_monotone():
    buckets = [store.width_bucket(n) for n in range(1, 600)]
    assert all(b >= n for n, b in zip(range(1, 600), buckets, strict=True))
    assert all(b <= max(2, 1.5 * n) for n, b in zip(range(1, 600), buckets, strict=True))
    assert buckets == sorted(buckets)
    # the paper's 6.25 % and 25 % windows (about 69 and 108 pages) get different records
    assert store.width_bucket(69) != store.width_bucket(108)


GOOD = {**dataclasses.asdict(WINNER), "ms": 0.5}
BAD_RECORDS = {
    "missing field": {k: v for k, v in GOOD.items() if k != "num_warps"},
    "block_m=7": {**GOOD, "block_m": 7},
    "string warps": {**GOOD, "num_warps": "8"},
    "num_stages=0": {**GOOD, "num_stages": 0},
    "float block_n": {**GOOD, "block_n": 16.0},
    "string tma": {**GOOD, "tma": "yes"},
    "kv_splits=0": {**GOOD, "kv_splits": 0},
    "not an object": [32, 4, 3],
}


@pytest.mark.parametrize("kind", BAD_RECORDS)
def test_a_bad_record_is_skipped_with_one_warning_and_the_rest_kept(fresh_store, kind):
    p, other = problem(100), problem(300)
    bad_key = store.tuning_key(other)
    records = {store.tuning_key(p): GOOD, bad_key: BAD_RECORDS[kind]}
    fresh_store.write_text(json.dumps(records))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.lookup(p) == WINNER
        assert store.lookup(other) is None
        assert store.lookup(p) == WINNER
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert str(fresh_store) in message and bad_key in message


def test_a_record_older_than_a_field_means_its_default(fresh_store):
    # records written before kv_splits and fused_dq existed lack them: they are the unsplit
    # walk and the split backward, no warning
    p = problem(100)
    old = {k: v for k, v in GOOD.items() if k not in ("kv_splits", "fused_dq")}
    fresh_store.write_text(json.dumps({store.tuning_key(p): old}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.lookup(p) == WINNER and WINNER.kv_splits == 1 and not WINNER.fused_dq


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_an_unreadable_store_warns_and_finds_nothing(fresh_store, text):
    fresh_store.write_text(text)
    with pytest.warns(UserWarning, match="autotune store"):
        assert store.lookup(problem(100)) is None


def test_saving_keeps_the_records_it_cannot_read(fresh_store, monkeypatch):
    bad = {"some other key": BAD_RECORDS["block_m=7"]}
    fresh_store.write_text(json.dumps(bad))
    p = problem(100)
    store.save(store.tuning_key(p), WINNER, 0.5)
    stored = json.loads(fresh_store.read_text())
    assert stored["some other key"] == bad["some other key"]
    new_process(monkeypatch)
    with pytest.warns(UserWarning, match="some other key"):
        assert store.lookup(p) == WINNER


def test_an_unwritable_store_keeps_the_winner_in_memory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path / "file" / "cache"))
    new_process(monkeypatch)
    p = problem(100)
    with pytest.warns(UserWarning, match="cannot write"):
        store.save(store.tuning_key(p), WINNER, 0.5)
    assert store.lookup(p) == WINNER


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(block_m=7), "block_m"),
        (dict(block_m=True), "block_m"),
        (dict(block_n=8), "block_n"),
        (dict(num_warps=3), "num_warps"),
        (dict(num_warps=64), "num_warps"),
        (dict(num_warps="8"), "num_warps"),
        (dict(num_stages=0), "num_stages"),
        (dict(tma=1), "tma"),
        (dict(scheduled=None), "scheduled"),
        (dict(kv_splits=0), "kv_splits"),
        (dict(kv_splits=2.0), "kv_splits"),
        (dict(fused_dq=1), "fused_dq"),
        (dict(fused_dq=True, kv_splits=2), "fused_dq"),
    ],
)
def test_invalid_launch_configs_name_the_field(change, field):
    with pytest.raises((ValueError, TypeError), match=f"LaunchConfig.{field}"):
        LaunchConfig(**change)


def test_backward_kernels_have_their_own_records(fresh_store, monkeypatch):
    p = problem(100)
    assert '"kernel"' not in store.tuning_key(p)  # the forward's keys are unchanged
    dq = LaunchConfig(block_m=32, num_warps=4, num_stages=1, block_n=16)
    store.save(store.tuning_key(p, "bwd_dq"), dq, 0.5)
    new_process(monkeypatch)
    assert store.lookup(p, "bwd_dq") == dq
    assert store.lookup(p) is None and store.lookup(p, "bwd_dkdv") is None
