"""Autotuner: the interpreter's single config; the pruned search space on CUDA."""

import dataclasses

import pytest
import torch

import codegen.store as store
import codegen.tuning as at
from codegen.config import LaunchConfig
from codegen.samples import sample_problem, small_inputs


def problem(q_len: int, **kw):
    return sample_problem(small_inputs(q_len=q_len, q_block=32, **kw))


def test_interpreter_gets_one_config_without_timing(monkeypatch):
    monkeypatch.setattr(at.triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed"))
    args = small_inputs(q_block=32, seed=1)
    config = at.autotune(**args)
    assert isinstance(config, LaunchConfig) and config.block_m <= 32


def test_ensure_tuned_times_nothing_off_cuda(monkeypatch):
    monkeypatch.setattr(at.triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(at, "save", lambda *a, **k: pytest.fail("stored"))
    at.ensure_tuned(problem(40), return_lse=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ensure_tuned_tunes_a_bucket_once_and_never_under_capture(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(store, "_memory", None)
    monkeypatch.setattr(store, "_hits", {})
    p = problem(100, device="cuda")
    winner = LaunchConfig(block_m=32, num_warps=4, num_stages=2)
    tuned = []

    def fake_tune(p, *args, **kwargs):
        tuned.append(p)
        at.save(at.tuning_key(p), winner, 1.0)

    monkeypatch.setattr(at, "_tune", fake_tune)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        at.ensure_tuned(p, return_lse=False)  # a capture cannot time: nothing tuned
    assert not tuned
    at.ensure_tuned(p, return_lse=False)
    at.ensure_tuned(p, return_lse=True)  # the LSE is not part of the bucket
    assert len(tuned) == 1 and at.lookup(p) == winner


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


def test_backward_interpreter_gets_fixed_configs_without_timing(monkeypatch):
    from codegen.launch_bwd import default_backward_configs

    monkeypatch.setattr(at.triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed"))
    args = small_inputs(q_block=32, seed=1)
    configs = at.autotune_backward(**args)
    assert configs == default_backward_configs(sample_problem(args), interpret=True)
    assert not configs[1].fused_dq
    # deterministic=False: the dK/dV tile that adds dQ too
    dq, fused = at.autotune_backward(**args, deterministic=False)
    assert (dq, fused) == (configs[0], dataclasses.replace(configs[1], fused_dq=True))
    with pytest.raises(TypeError, match="deterministic"):
        at.autotune_backward(**args, deterministic=None)


@pytest.mark.parametrize("kernel", ["bwd_dq", "bwd_dkdv"])
def test_backward_candidates_divide_and_fit(kernel):
    p = problem(100, head_dim=64, page_size=32, num_pages=3)
    limit = 64 * 1024
    configs = at.backward_candidates(p, kernel, limit)
    assert configs and len(set(configs)) == len(configs)
    for c in configs:
        assert p.q_block % c.block_m == 0 and p.page_size % c.block_n == 0
        assert at.backward_shared_memory_estimate(p, c, kernel) <= limit
    # A smaller budget prunes the larger tiles first.
    small = at.backward_candidates(p, kernel, limit // 4)
    assert len(small) < len(configs) and set(small) <= set(configs)
