"""Head-parallel rollouts (`runtime.parallel`, `runtime.parallel_eager`) on gloo, 2 and 3
processes spawned here: the rollout equals one process's, each rank holds 1/N of the KV
bytes, and a call rejected on one rank is rejected on all with every cache unchanged."""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from patterns import PersistentLocal, VideoGeometry
from runtime import (
    AttentionRuntime,
    CausalWanModel,
    EagerRunner,
    HeadParallelEagerRunner,
    WanConfig,
    generate,
    head_parallel_reference_runner,
    reference_runner,
)
from runtime.distributed import HeadGroup, RankDisagreement, check_head_split
from sparsify import sparsify
from sparsify.defaults import example_chunk

CHUNKS = 3
TIMEOUT_S = 120


def _config() -> WanConfig:
    # 6 heads (divisible by 2 and 3), one layer, 32 tokens (two pages) per frame: small
    return WanConfig.preset(
        "tiny", dim=96, num_heads=6, num_kv_heads=6, num_layers=1, latent_height=8
    )


def _model_and_context():
    config = _config()
    context = torch.randn(1, config.text_len, config.text_dim, generator=torch.Generator())
    return config, CausalWanModel(config).eval(), context


def _pattern() -> PersistentLocal:
    # the window's frames leave at the second commit: the third chunk reads persistent pages
    return PersistentLocal(persistent_blocks=3, window_frames=6, local_topk=3)


@torch.no_grad()
def _perturb_scorers(runtime: AttentionRuntime) -> None:
    """Per-head scorer weights, so that a rank given the wrong heads' slice selects
    differently."""
    generator = torch.Generator().manual_seed(3)
    for state in runtime.states:
        for param in (state.scorer.wq, state.scorer.wk):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))


def _rollout(runner, config, context, chunks=CHUNKS):
    shape = (config.in_channels, config.latent_height, config.latent_width)
    return generate(runner, context, chunks, latent_shape=shape, progress=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s bytes: the buffers are allocated empty, and their unwritten tail may
    hold NaN patterns, which `torch.equal` never calls equal to themselves."""
    return t.detach().clone().contiguous().view(torch.uint8)


def _snapshot(runner) -> list:
    """Everything the runner's cache holds (device and host state), bit for bit."""
    if isinstance(runner, EagerRunner):
        cache = runner.cache
        slots = [(_bits(s.k), _bits(s.v), s.tokens) for s in cache._slots]
        return [runner.next_frame, cache.frames, cache.kv_bytes, slots]
    rt = runner.runtime
    pool = rt.pool
    tensors = [_bits(t) for t in (pool.k, pool.v, pool.page_lens, pool.key_reps, pool.used)]
    layers = [(s.frames, s.num_persistent, s.committed_frames, s.page_ids()) for s in rt.states]
    return [rt.committed_frames, pool.num_used, tensors, layers]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _rejected_everywhere(call) -> bool:
    """Whether ``call`` raised here (every rank must: the rank that rejected and the others)."""
    try:
        call()
    except (ValueError, TypeError, RankDisagreement):
        return True
    return False


@torch.no_grad()
def _check_rejections(runner, config, context, rank: int, world: int) -> dict:
    """Two chunks in (history and persistent pages held), a bad call on one rank is rejected
    on all, with no cache changed, and the runner still runs the third chunk."""
    f = config.frames_per_chunk
    x = torch.randn(1, config.in_channels, f, config.latent_height, config.latent_width)
    t = torch.zeros(1, f)
    runner.reset(1, "cpu", torch.float32, 3 * f)
    for start in (0, f):
        runner(x, t, context, start, True)
    before, start = _snapshot(runner), 2 * f
    bad_x = x.double() if rank == 0 else x  # bad input on rank 0 only
    results = {"bad_input": _rejected_everywhere(lambda: runner(bad_x, t, context, start, True))}
    results["bad_input_unchanged"] = _same(before, _snapshot(runner))
    # past max_frames on the last rank only (on the others the reset would empty the cache)
    frames = config.max_frames + f if rank == world - 1 else 3 * f
    results["past_max_frames"] = _rejected_everywhere(
        lambda: runner.reset(1, "cpu", torch.float32, frames)
    )
    results["past_max_frames_unchanged"] = _same(before, _snapshot(runner))
    wrong = start + f if rank == 1 else start  # a start frame wrong on one rank only
    results["wrong_start"] = _rejected_everywhere(lambda: runner(x, t, context, wrong, False))
    results["wrong_start_unchanged"] = _same(before, _snapshot(runner))
    runner(x, t, context, start, True)  # still usable: the pass runs on every rank
    results["committed"] = _snapshot(runner)[0] == 3 * f
    return results


def _worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
        config, model, context = _model_and_context()
        record = {}
        dense = HeadParallelEagerRunner(model)
        record["dense"] = _rollout(dense, config, context)
        record["dense_bytes"] = dense.peak_kv_bytes
        record["dense_rejections"] = _check_rejections(dense, config, context, rank, world)

        single = reference_runner(model, _pattern(), page_size=16, q_block=16)
        _perturb_scorers(single.runtime)
        sparse = head_parallel_reference_runner(model, _pattern(), page_size=16, q_block=16)
        sparse.runtime.load_scorers_from(single.runtime)
        record["sparse"] = _rollout(sparse, config, context)
        record["sparse_bytes"] = sparse.peak_kv_bytes
        record["sparse_rejections"] = _check_rejections(sparse, config, context, rank, world)
        if world == 2:  # the compiler's path too (once: capturing costs seconds per process)
            geometry = VideoGeometry(config.tokens_per_frame, config.frames_per_chunk, 16, 16)
            example = example_chunk(config, context)
            module = sparsify(model, example, _pattern(), geometry=geometry, parallel="heads")
            module.runtime.load_scorers_from(single.runtime)
            record["sparsified"] = _rollout(module, config, context)
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process():
    """The same rollouts in this process: dense eager and PersistentLocal."""
    config, model, context = _model_and_context()
    dense = EagerRunner(model)
    sparse = reference_runner(model, _pattern(), page_size=16, q_block=16)
    _perturb_scorers(sparse.runtime)
    return {
        "dense": _rollout(dense, config, context),
        "dense_bytes": dense.peak_kv_bytes,
        "sparse": _rollout(sparse, config, context),
        "sparse_bytes": sparse.peak_kv_bytes,
    }


WORLDS = (2, 3)


def _join(context, world: int, tmp: str, deadline: float) -> list[dict]:
    try:
        # join returns False each time one process ends while others still run
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException as exc:
        errors = [f for f in os.listdir(tmp) if f.endswith(".err")]
        details = "".join(Path(tmp, f).read_text() for f in sorted(errors))
        pytest.fail(f"a rank of {world} failed: {exc}\n{details}")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def parallel_records():
    """Every rank's record, by world size; the 2- and 3-process groups run at the same time
    (their start-up, mostly imports, then overlaps on the two cores of CI)."""
    with tempfile.TemporaryDirectory() as tmp:
        contexts = {}
        try:
            for world in WORLDS:
                folder = os.path.join(tmp, str(world))
                os.mkdir(folder)
                rendezvous = f"file://{os.path.join(folder, 'rendezvous')}"
                contexts[world] = mp.spawn(
                    _worker, args=(world, rendezvous, folder), nprocs=world, join=False
                )
            deadline = time.monotonic() + TIMEOUT_S
            yield {w: _join(c, w, os.path.join(tmp, str(w)), deadline) for w, c in contexts.items()}
        finally:
            for context in contexts.values():
                for process in context.processes:
                    if process.is_alive():
                        process.kill()


@pytest.mark.parametrize("world", WORLDS)
def test_head_parallel_rollout_equals_one_process(world, single_process, parallel_records):
    records = parallel_records[world]
    for rank, record in enumerate(records):
        for impl in ("dense", "sparse"):
            torch.testing.assert_close(
                record[impl], single_process[impl], rtol=1e-5, atol=1e-5, msg=f"{impl} rank {rank}"
            )
            assert record[f"{impl}_bytes"] * world == single_process[f"{impl}_bytes"], impl
            rejections = record[f"{impl}_rejections"]
            assert rejections == dict.fromkeys(rejections, True), (impl, rank, rejections)
        if world == 2:
            torch.testing.assert_close(record["sparsified"], single_process["sparse"])


def test_sparsify_parallel_option_is_checked():
    config, model, context = _model_and_context()
    example = example_chunk(config, context)
    with pytest.raises(ValueError, match="parallel: expected one of"):
        sparsify(model, example, _pattern(), parallel="sequence")
    with pytest.raises(ValueError, match="parallel: 'heads' needs mode='cached'"):
        sparsify(model, example, _pattern(), parallel="heads", mode="full_sequence")


def test_world_size_must_divide_the_kv_heads():
    check_head_split(12, 12, 4)
    with pytest.raises(ValueError, match=r"world_size=5 \(torchrun --nproc-per-node\).*\[1, 2, 3"):
        check_head_split(12, 12, 5)
    with pytest.raises(ValueError, match="world_size=4"):
        check_head_split(12, 2, 4)  # 4 divides the query heads but would split a GQA group


def test_head_group_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="parallel: .*torchrun"):
        HeadGroup(6, 6)
