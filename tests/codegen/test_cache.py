"""The on-disk source cache and get_kernel."""

import threading

import pytest

import codegen.cache as cache
from codegen.spec import KernelSpec


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path))
    calls = []
    real = cache.render

    def counting_render(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(cache, "render", counting_render)
    return tmp_path, calls


def test_same_spec_hits_the_disk_cache(fresh_cache):
    root, calls = fresh_cache
    spec = KernelSpec(block_m=64, head_dim=32, block_n=16, q_block=64)
    first = cache.kernel_source_path(spec)
    second = cache.kernel_source_path(spec)
    assert first == second and first.is_relative_to(root) and len(calls) == 1
    other = cache.kernel_source_path(KernelSpec(block_m=64, head_dim=64, block_n=16, q_block=64))
    assert other != first and len(calls) == 2
    assert first.read_text() != other.read_text()


def test_get_kernel_imports_the_cached_source(fresh_cache):
    _, calls = fresh_cache
    spec = KernelSpec(block_m=32, head_dim=16, block_n=16, q_block=32)
    kernel = cache.get_kernel(spec)
    assert kernel.fn.__name__ == spec.name
    assert cache.get_kernel(spec).fn is kernel.fn and len(calls) == 1


def test_concurrent_generation_leaves_one_complete_file(fresh_cache):
    root, _ = fresh_cache
    spec = KernelSpec(tma=True)
    threads = [threading.Thread(target=cache.kernel_source_path, args=(spec,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = list((root / "kernels").iterdir())
    assert [f.suffix for f in files] == [".py"]
    assert files[0].read_text() == cache.render(spec)


def test_cache_dir_defaults_under_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSE_FORCING_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "sparse_forcing"
