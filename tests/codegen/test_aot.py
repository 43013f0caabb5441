"""The generated kernels, compiled for Hopper (sm_90) on the CPU by `codegen.aot`: every
2-D tile load in a loop is asynchronous (pipelined), and every 2-D global access is
vectorised (16 bytes per thread), with the specialisation Triton's JIT gives a launch."""

import pytest

from codegen.aot import compile_reports
from codegen.config import LaunchConfig
from codegen.spec import KernelSpec

pytestmark = pytest.mark.slow

PAGED = KernelSpec(block_m=64, block_n=64, paged=True, partial=True)
JOBS = [
    # pointer-load forward over a page pool, 64-key steps
    (PAGED, "fwd", LaunchConfig(64, 4, 3, block_n=64)),
    # TMA forward: only q and out are pointer accesses
    (KernelSpec(block_m=128, tma=True), "fwd", LaunchConfig(128, 8, 3, tma=True)),
    # backward, the defaults' tiles: dQ over pages, dK/dV over contiguous BLHD with GQA
    (KernelSpec(block_m=128, block_n=64), "bwd_dq", LaunchConfig(128, 8, 3, block_n=64)),
    (KernelSpec(block_m=64, paged=False, group=2), "bwd_dkdv", LaunchConfig(64, 8, 2)),
    # dK/dV adding dQ by atomics: the atomics must not stop the pipelining
    (KernelSpec(block_m=32), "bwd_fused", LaunchConfig(32, 8, 2, fused_dq=True)),
    (KernelSpec(block_m=64, dtype="float16", layout="BHLD", paged=False), "bwd_delta",
     LaunchConfig(64, 4, 1)),
    # a split walk (float32 partials) and the merge of its shares
    (KernelSpec(block_m=128, tma=True, kv_splits=2), "fwd",
     LaunchConfig(128, 8, 3, tma=True, kv_splits=2)),
    (KernelSpec(block_m=128, kv_splits=2), "fwd_merge", LaunchConfig(128, 4, 1, kv_splits=2)),
    (KernelSpec(block_m=128, block_n=64, kv_splits=2), "bwd_dq",
     LaunchConfig(128, 8, 3, block_n=64, kv_splits=2)),
]  # fmt: skip


@pytest.fixture(scope="module")
def reports():
    return compile_reports(JOBS)


@pytest.mark.parametrize("job", range(len(JOBS)), ids=lambda i: f"{JOBS[i][1]}-{JOBS[i][0].name}")
def test_tile_accesses_are_vectorised_and_loop_loads_pipelined(reports, job):
    spec, kernel, _ = JOBS[job]
    report = reports[job]
    assert report.narrow_accesses == 0, report.ttgir
    assert report.sync_loop_loads == 0, report.ttgir
    if kernel not in ("bwd_delta", "fwd_merge"):  # kernels without a loop
        assert report.async_loads >= 2
    assert 0 < report.registers <= 255
    if kernel == "fwd":  # its tiles are staged in shared memory for the tensor cores
        assert report.shared_bytes > 0


# Two layouts as Triton prints them: one element per thread (a 2-byte access for bf16) and
# eight (16 bytes); a loop whose tile load stays synchronous, a store outside it, and fp32
# tiles: four per thread are 16 bytes, one is narrow.
TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], order = [1, 0]}>
#blocked3 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [1, 32], order = [1, 0]}>
module {
  tt.func public @k(%arg0: !tt.ptr<bf16>) {
    %q = tt.load %p : tensor<64x128x!tt.ptr<bf16>, #blocked1> loc(#loc1)
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z, %b = %z) -> (f32, f32)  : i32 {
      %k = tt.load %kp : tensor<64x128x!tt.ptr<bf16>, #blocked> loc(#loc2)
      %l = tt.load %lp : tensor<64x!tt.ptr<f32>, #blocked2> loc(#loc3)
      %c = ttg.async_copy_global_to_local %vp, %b : tensor<64x128x!tt.ptr<bf16>, #blocked1> -> <>
      scf.yield %a, %b : f32, f32
    }
    tt.store %o, %v : tensor<64x128x!tt.ptr<bf16>, #blocked> loc(#loc4)
    tt.store %p, %w : tensor<64x128x!tt.ptr<f32>, #blocked3> loc(#loc5)
    tt.store %p, %w : tensor<64x128x!tt.ptr<f32>, #blocked> loc(#loc6)
    tt.return
  }
}
"""


def test_the_counts_see_synchronous_loop_loads_and_narrow_accesses():
    from codegen.aot import tile_access_counts

    counts = tile_access_counts(TTGIR)
    # the loop's 2-D tt.load (not the 1-D one, not the load before the loop); the loop's
    # copy; the narrow bf16 load in the loop, the narrow bf16 and fp32 stores after it
    assert counts == dict(sync_loop_loads=1, async_loads=1, narrow_accesses=3)
