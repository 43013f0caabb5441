"""The on-disk source cache and get_kernel."""

import threading

import pytest
import torch

import codegen.cache as cache
from codegen.spec import KernelSpec


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(tmp_path))
    calls = []
    real = cache.render

    def counting_render(spec, *module):
        calls.append(spec)
        return real(spec, *module)

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


def new_process(monkeypatch) -> None:
    """Forget the kernels this process imported and the files it verified."""
    import codegen.launch as launch

    monkeypatch.setattr(cache, "_modules", {})
    monkeypatch.setattr(cache, "_verified", set(), raising=False)
    monkeypatch.setattr(launch, "_kernels", {})


def cut_after_last_loop(text: str) -> str:
    """The source cut at a line boundary: everything from the normalisation on is lost, so
    the module still imports but never writes out or the LSE."""
    return text[: text.index("    # Normalise.")]


def lose_log2e(text: str) -> str:
    edited = text.replace("LOG2E = tl.constexpr(1.4426950408889634)", "LOG2E = tl.constexpr(1.0)")
    assert edited != text
    return edited


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="forces the interpreter backend, which fails in a CUDA process (H200, 2026-12-02)",
)
@pytest.mark.parametrize("damage", [cut_after_last_loop, lose_log2e])
def test_a_damaged_cached_source_is_regenerated(fresh_cache, monkeypatch, damage):
    import torch

    from codegen import pbsa_attention
    from codegen.reference import pbsa_reference
    from codegen.samples import small_inputs

    args = small_inputs(seed=4)
    expected, expected_lse = pbsa_reference(**args)
    new_process(monkeypatch)
    pbsa_attention(**args, backend="interpret")  # writes the source
    [path] = (fresh_cache[0] / "kernels").iterdir()
    good = path.read_text()
    path.write_text(damage(good))
    new_process(monkeypatch)
    with pytest.warns(UserWarning, match="differs from its render"):
        out, lse = pbsa_attention(**args, backend="interpret")
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=1e-4)
    live = ~torch.isinf(expected_lse)
    torch.testing.assert_close(lse.double()[live], expected_lse[live], atol=1e-4, rtol=1e-5)
    assert path.read_text() == good


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="forces the interpreter backend, which fails in a CUDA process (H200, 2026-12-02)",
)
def test_an_unwritable_cache_dir_falls_back_to_a_temporary_one(tmp_path, monkeypatch):
    import torch

    from codegen import pbsa_attention
    from codegen.reference import pbsa_reference
    from codegen.samples import small_inputs

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSE_FORCING_CACHE_DIR", str(blocker / "cache"))
    new_process(monkeypatch)
    monkeypatch.setattr(cache, "_fallbacks", {}, raising=False)
    args = small_inputs(seed=5)
    with pytest.warns(UserWarning, match="not writable") as caught:
        out, _ = pbsa_attention(**args, backend="interpret")
        pbsa_attention(**{**args, "return_lse": False}, backend="interpret")  # another kernel
    assert len([w for w in caught if "not writable" in str(w.message)]) == 1
    expected, _ = pbsa_reference(**args)
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=1e-4)
    assert blocker.read_text() == ""


def test_backward_kernels_live_in_their_own_cached_module(fresh_cache):
    from codegen.render import kernel_name

    root, calls = fresh_cache
    spec = KernelSpec(block_m=32, head_dim=16, block_n=16, q_block=32)
    fwd, bwd = cache.kernel_source_path(spec), cache.kernel_source_path(spec, "bwd")
    assert fwd != bwd and bwd.is_relative_to(root) and len(calls) == 2
    for kernel in ("bwd_delta", "bwd_dq", "bwd_dkdv"):
        assert cache.get_kernel(spec, kernel=kernel).fn.__name__ == kernel_name(spec, kernel)
    assert len(calls) == 2  # one render per module and process
