"""Backward benchmark (BENCHMARKS.md): PBSA forward + backward vs compiled flex and dense SDPA.

    python -m bench.backward --json out.json [--cases sf5s,paper65k] [--world-step]
        [--profile-step]

The kernel benchmark's cases, densities, inputs and block tables (`codegen.samples`,
`bench.kernel`). Per implementation the forward (`ms`) and the backward alone (`bwd_ms`:
``torch.autograd.grad`` of dQ, dK, dV over a retained graph, so no forward in it) are timed
in `bench.kernel.ROUNDS` interleaved rounds, medians. `flex` is `torch.compile(flex_attention)`
with the same `BlockMask` (its backward is compiled too); `sdpa_dense` is the fastest SDPA
backend by backward time. `pbsa_fused` is `pbsa` with ``deterministic=False``: its backward
adds dQ in the dK/dV kernel by float atomics (five products per block instead of seven).
Records carry the kernel benchmark's columns plus `bwd_ms`,
`bwd_tflops` (2.5x the forward's FLOPs: dS, dQ, dK, dV and the recomputed QKᵀ),
`bwd_speedup_vs_sdpa`, `bwd_speedup_vs_flex` and `bwd_efficiency` (= bwd_speedup_vs_sdpa /
ideal_speedup: throughput per computed block relative to SDPA's backward).

`--world-step` adds one training step (forward, backward, AdamW step) of the world model
(`world.weights.load_world_model`) on a clip of random latents, in full-sequence mode:
the model itself (SDPA, dense) against `sparsify(model, default pattern, mode="full_sequence")`,
each eager and under `torch.compile` (the step function whole: forward, backward and the
optimizer); `speedup` compares sparse with dense of the same mode. A step that fails to
compile is reported with its error instead of a time. `--profile-step` adds, per eager
step, its wall and summed GPU milliseconds, kernel launches and top kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from bench.common import device_record, kernel_profile, time_ms, write_json
from bench.kernel import (
    ROUNDS,
    _record,
    computed_tokens,
    flex_block_mask,
    pbsa_variants,
    sdpa_backends,
)
from codegen.reference import pbsa_reference_backward
from codegen.samples import CASES, PAGE, Q_BLOCK, KernelCase, build_table, case_tensors
from sparsify.tables import format_table

BWD_FLOP_RATIO = 2.5


def _grad_timer(run: Callable[[], torch.Tensor], inputs: tuple) -> Callable[[], object]:
    """A callable timing only the backward of `run()`'s output (graph kept between calls)."""
    out = run()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _oracle_error(a: tuple, got: tuple, grad: torch.Tensor, kw: dict) -> float:
    """Max abs difference of PBSA's (dq, dk, dv) from the float64 oracle's on query head 0
    (and its kv head; the cases are MHA): the check that does not lean on flex agreeing."""
    q, k, v, counts, idx, page_lens = a
    if k.shape[2] != q.shape[2]:
        raise ValueError("bench.backward: the oracle check slices one head of an MHA case")
    head = slice(0, 1)
    call = {key: val for key, val in kw.items() if key != "return_lse"}
    oracle = pbsa_reference_backward(
        grad[:, :, head],
        q[:, :, head],
        k[:, :, head],
        v[:, :, head],
        counts[:, head],
        idx[:, head],
        page_lens,
        **call,
    )
    return max(
        float((g[:, :, head].double() - r).abs().max()) for g, r in zip(got, oracle, strict=True)
    )


def run_case(case: KernelCase, seed: int = 0) -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    import codegen

    # The timers call backward repeatedly over one retained graph; compiled flex's backward
    # donates its saved buffers unless told not to (then it refuses retain_graph=True).
    functorch_config.donated_buffer = False
    dev = torch.device("cuda")
    q, k, v, k_pool, v_pool, page_lens = (
        t.requires_grad_() if t.is_floating_point() else t for t in case_tensors(case, dev, seed)
    )
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    fwd: dict[tuple[float | None, str], Callable[[], object]] = {}
    bwd: dict[tuple[float | None, str], Callable[[], object]] = {}

    sdpa_bwd = {}
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]):
                timer = _grad_timer(lambda: F.scaled_dot_product_attention(qt, kt, vt), (q, k, v))
                sdpa_bwd[name] = (time_ms(timer), backend, timer)
        except RuntimeError as err:
            print(f"sdpa {name}: unavailable ({str(err)[:80]})", file=sys.stderr)
    sdpa_name = min(sdpa_bwd, key=lambda n: sdpa_bwd[n][0])
    sdpa_backend = sdpa_bwd[sdpa_name][1]

    def sdpa() -> None:
        with sdpa_kernel([sdpa_backend]):
            F.scaled_dot_product_attention(qt, kt, vt)

    fwd[None, "sdpa_dense"], bwd[None, "sdpa_dense"] = sdpa, sdpa_bwd[sdpa_name][2]

    flex = torch.compile(flex_attention, dynamic=False)
    kw = dict(layout="BLHD", q_block=Q_BLOCK, page_size=PAGE, return_lse=False)
    computed, errors, oracle_errors = {}, {}, {}
    for density in case.densities:
        counts, idx = build_table(case, density, dev, seed)
        computed[density] = computed_tokens(case, counts)
        mask = flex_block_mask(case, counts, idx)
        fwd[density, "flex"] = lambda m=mask: flex(qt, kt, vt, block_mask=m)
        bwd[density, "flex"] = _grad_timer(fwd[density, "flex"], (q, k, v))
        grad = torch.randn_like(q)
        ref = torch.autograd.grad(fwd[density, "flex"]().transpose(1, 2), (q, k, v), grad)
        variants = pbsa_variants(q, k, v, (k_pool, v_pool, page_lens), counts, idx)
        # pbsa_fused: the contiguous call with deterministic=False (dQ added by the dK/dV
        # kernel with float atomics)
        variants = {**variants, "pbsa_fused": variants["pbsa"]}
        for impl, a in variants.items():
            options = dict(kw, deterministic=impl != "pbsa_fused")
            fwd[density, impl] = lambda a=a, o=options: codegen.pbsa_attention(*a, **o)[0]
            bwd[density, impl] = _grad_timer(fwd[density, impl], a[:3])
            if impl in ("pbsa", "pbsa_fused"):
                got = torch.autograd.grad(fwd[density, impl](), a[:3], grad)
                errors[density, impl] = max(
                    float((g.float() - r.float()).abs().max())
                    for g, r in zip(got, ref, strict=True)
                )
                oracle_errors[density, impl] = _oracle_error(a, got, grad, kw)

    samples = {key: ([], []) for key in fwd}
    for _ in range(ROUNDS):
        for key in fwd:
            samples[key][0].append(time_ms(fwd[key]))
            samples[key][1].append(time_ms(bwd[key]))
    ms = {key: statistics.median(s[0]) for key, s in samples.items()}
    bwd_ms = {key: statistics.median(s[1]) for key, s in samples.items()}

    def record(density, impl, tokens, **extra) -> dict:
        key = (density, impl)
        rec = _record(case, density, impl, ms[key], tokens, bwd_ms=bwd_ms[key], **extra)
        rec["bwd_tflops"] = rec["tflops"] * ms[key] / bwd_ms[key] * BWD_FLOP_RATIO
        rec["speedup_vs_sdpa"] = ms[None, "sdpa_dense"] / ms[key]
        rec["bwd_speedup_vs_sdpa"] = bwd_ms[None, "sdpa_dense"] / bwd_ms[key]
        rec["efficiency"] = rec["speedup_vs_sdpa"] / rec["ideal_speedup"]
        rec["bwd_efficiency"] = rec["bwd_speedup_vs_sdpa"] / rec["ideal_speedup"]
        if density is not None:
            rec["speedup_vs_flex"] = ms[density, "flex"] / ms[key]
            rec["bwd_speedup_vs_flex"] = bwd_ms[density, "flex"] / bwd_ms[key]
        return rec

    records = [record(None, "sdpa_dense", float(case.kv_tokens), sdpa_backend=sdpa_name)]
    for density in case.densities:
        for impl in ("flex", "pbsa", "pbsa_paged", "pbsa_fused"):
            extra = {}
            if impl in ("pbsa", "pbsa_fused"):
                extra = dict(
                    max_abs_grad_diff_vs_flex=errors[density, impl],
                    max_abs_grad_diff_vs_oracle_head0=oracle_errors[density, impl],
                    # flex's backward is deterministic; the fused one's dQ is not
                    deterministic=impl == "pbsa",
                )
            records.append(record(density, impl, computed[density], **extra))
    return records


def world_step(rounds: int = ROUNDS, profile: bool = False) -> list[dict]:
    """One training step of the world model, dense vs sparse (full-sequence mode), eager and
    compiled; with `profile`, each eager step's `bench.common.kernel_profile` too."""
    from sparsify import sparsify
    from sparsify.defaults import default_geometry, default_pattern
    from world.weights import load_world_model

    dev = torch.device("cuda")
    records = []
    model = load_world_model(device=dev, dtype=torch.bfloat16).train()
    cfg = model.config
    frames = 4 * cfg.frames_per_chunk
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, cfg.in_channels, frames, cfg.latent_height, cfg.latent_width)
    x = torch.randn(shape, device=dev, generator=g).bfloat16()
    target = torch.randn(shape, device=dev, generator=g)
    timestep = torch.full((1, frames), 500.0, device=dev, dtype=torch.bfloat16)
    context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16)
    geometry = default_geometry(cfg.tokens_per_frame, cfg.frames_per_chunk)
    pattern = default_pattern(geometry)
    sparse = sparsify(
        model, (x, timestep, context, 0), pattern, geometry=geometry, mode="full_sequence"
    )
    for mode in ("eager", "compiled"):
        for impl, module in (("dense", model), ("sparse", sparse)):
            opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

            def step(module=module, opt=opt) -> None:
                loss = F.mse_loss(module(x, timestep, context, 0).float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            record = dict(impl=impl, mode=mode, frames=frames,
                          pattern=str(pattern) if impl == "sparse" else "dense")  # fmt: skip
            try:
                run = torch.compile(step) if mode == "compiled" else step
                times = [time_ms(run, warmup=3, rep=10) for _ in range(rounds)]
                record["step_ms"] = statistics.median(times)
                if profile and mode == "eager":
                    record["profile"] = kernel_profile(run)
            except Exception as error:  # reported in the record, the other steps still run
                record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            records.append(record)
        dense, sparse_step = records[-2], records[-1]
        if "step_ms" in dense and "step_ms" in sparse_step:
            sparse_step["speedup"] = dense["step_ms"] / sparse_step["step_ms"]
    return records


COLUMNS = [
    "case", "density", "impl", "ms", "bwd_ms", "computed_kv_tokens", "bwd_tflops",
    "bwd_speedup_vs_sdpa", "bwd_speedup_vs_flex", "ideal_speedup", "efficiency",
    "bwd_efficiency",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write records here")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated case names ('' for none)"
    )
    parser.add_argument("--world-step", action="store_true", help="also time a world train step")
    parser.add_argument(
        "--profile-step",
        action="store_true",
        help="with --world-step: GPU ms, launches and top kernels of each eager step",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.backward needs a CUDA device", file=sys.stderr)
        return 2
    records = []
    for name in filter(None, args.cases.split(",")):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; expected some of {sorted(CASES)}")
        records += run_case(CASES[name])
    world = world_step(profile=args.profile_step) if args.world_step else []
    card = device_record()
    write_json(args.json, dict(device=card, records=records, world_step=world))
    print(card)
    if world:
        print(format_table(world, ["impl", "mode", "frames", "step_ms", "speedup", "error"]))
        for record in world:
            if "profile" in record:
                prof = record["profile"]
                print(f"{record['impl']} eager step: wall {prof['wall_ms']:.1f} ms, GPU "
                      f"{prof['gpu_ms']:.1f} ms in {prof['launches']} kernels")  # fmt: skip
                print(format_table(prof["top"], ["kernel", "ms", "calls"]))
    print(format_table(records, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
