"""Autotuner: persisted winners per key and shape bucket; the interpreter's single config."""

import pytest
import torch

import codegen.tuning as at
from codegen.launch import LaunchConfig
from codegen.samples import random_inputs, sample_problem, small_inputs


def problem(q_len: int, num_pages: int = 4, **kw):
    return sample_problem(
        random_inputs(
            batch=1,
            heads=2,
            kv_heads=1,
            q_len=q_len,
            head_dim=16,
            page_size=16,
            q_block=32,
            num_pages=num_pages,
            seed=0,
            **kw,
        )
    )


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(at, "_memory", None)
    monkeypatch.setattr(at, "_hits", {})
    return tmp_path


def test_winner_is_persisted_and_found_for_the_same_bucket_only(fresh_store, monkeypatch):
    p = problem(100)
    winner = LaunchConfig(block_m=32, num_warps=4, num_stages=3, tma=True, block_n=16)
    at._save(at.tuning_key(p), winner, 0.5)
    assert (fresh_store / "autotune.json").exists()
    monkeypatch.setattr(at, "_memory", None)  # as a new process would
    monkeypatch.setattr(at, "_hits", {})
    assert at.lookup(p) == winner
    assert at.lookup(problem(120)) == winner  # same power-of-two bucket of Lq
    assert at.lookup(problem(300)) is None  # another bucket
    assert at.lookup(problem(100, dtype=torch.float16)) is None  # another structure


def test_key_names_device_versions_and_structure():
    key = at.tuning_key(problem(100))
    for field in ('"device"', '"torch"', '"triton"', '"spec"', '"lq": 128', '"kmax"'):
        assert field in key


def test_width_buckets_are_tight_and_monotone():
    buckets = [at._width_bucket(n) for n in range(1, 600)]
    assert all(b >= n for n, b in zip(range(1, 600), buckets, strict=True))
    assert all(b <= max(2, 1.5 * n) for n, b in zip(range(1, 600), buckets, strict=True))
    assert buckets == sorted(buckets)
    # the paper's 6.25 % and 25 % windows (about 69 and 108 pages) get different records
    assert at._width_bucket(69) != at._width_bucket(108)


def test_interpreter_gets_one_config_without_timing(monkeypatch):
    monkeypatch.setattr(at.triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed"))
    args = small_inputs(q_block=32, seed=1)
    config = at.autotune(**args)
    assert isinstance(config, LaunchConfig) and config.block_m <= 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_candidates_divide_and_fit():
    p = problem(100, device="cuda")
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    configs = at.candidate_configs(p)
    assert configs and len(set(configs)) == len(configs)
    for c in configs:
        assert p.q_block % c.block_m == 0
        assert at.shared_memory_estimate(p, c) <= limit
