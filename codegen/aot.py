"""Compiling a generated kernel for a GPU target on a machine without one.

`compile_report(spec, kernel, config)` runs Triton's own compiler (TTIR -> TTGIR -> PTX) for
the target, then the Triton wheel's ptxas, with the specialisation Triton's JIT gives a real
launch: 16-byte-aligned pointers and strides divisible by 16 (the launcher guarantees both),
sizes unspecialised. Its report says whether the loop's tile loads are pipelined and
vectorised, and what ptxas allocates: what the GPU would run, checked on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from codegen.cache import kernel_source_path
from codegen.config import LaunchConfig
from codegen.render import kernel_args, kernel_name, module_of
from codegen.spec import KernelSpec

_TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_INDEX_TENSORS = ("NumBlocks", "Indices", "PageLens", "Offsets", "Entries", "Schedule")
_FP32_TENSORS = ("Lse", "Delta", "Part", "PartLse", "DQAcc")


@dataclass(frozen=True)
class CompiledReport:
    """What one generated kernel compiles to for one target.

    registers: registers per thread (ptxas). spill_bytes: spill stores plus spill loads.
    shared_bytes: shared memory the kernel allocates.
    sync_loop_loads: 2-D tile loads inside a loop that stay synchronous (`tt.load` in the
        loop body): each one stalls its iteration; a pipelined loop has none.
    async_loads: 2-D tile loads issued asynchronously (cp.async or TMA copies).
    narrow_accesses: 2-D global loads and stores (outside TMA) whose per-thread vector is
        under 16 bytes, i.e. not vectorised.
    ttgir: the TritonGPU IR, for a reader who wants the detail.
    """

    registers: int
    spill_bytes: int
    shared_bytes: int
    sync_loop_loads: int
    async_loads: int
    narrow_accesses: int
    ttgir: str


def _signature(
    spec: KernelSpec, kernel: str, unspecialised: set[int]
) -> tuple[dict[str, str], dict]:
    """Triton's signature of the kernel and the attributes its JIT derives at a launch:
    pointers 16-byte aligned, and strides divisible by 16 unless the kernel opts out of
    specialising them (`unspecialised`, from its do_not_specialize)."""
    dtype = _TRITON_DTYPES[spec.dtype]
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel_args(spec, kernel)):
        if arg.kind == "tensor" and spec.tma and kernel == "fwd" and arg.name in ("K", "V"):
            signature[arg.name] = f"tensordesc<{dtype}[{spec.block_n}, {spec.head_dim}]>"
            continue
        if arg.kind == "tensor":
            element = (
                "i32"
                if arg.name in _INDEX_TENSORS
                else "fp32"
                if arg.name in _FP32_TENSORS
                else dtype
            )
            signature[arg.name] = f"*{element}"
        else:
            signature[arg.name] = "fp32" if arg.kind == "float" else "i32"
        if arg.kind == "tensor" or (arg.kind == "stride" and i not in unspecialised):
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature["UPCAST"] = "constexpr"
    return signature, attrs


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from `ptxas -v` of the Triton wheel."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    info = done.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return registers, spills


def _loop_bodies(ttgir: str) -> str:
    """The lines inside `scf.for` bodies (indented deeper than their loop)."""
    body, depth_stack = [], []
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while depth_stack and indent <= depth_stack[-1]:
            depth_stack.pop()
        if depth_stack:
            body.append(line)
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth_stack.append(indent)
    return "\n".join(body)


_TILE = r"tensor<\d+x\d+x!tt\.ptr<[a-z0-9]+>, #\w+>"
_TILE_PARTS = r"tensor<\d+x\d+x!tt\.ptr<([a-z]+)(\d+)>, #(\w+)>"


def _narrow_accesses(ttgir: str) -> int:
    """2-D pointer loads/stores whose blocked layout gives a thread < 16 contiguous bytes."""
    per_thread = {
        name: int(vec)
        for name, vec in re.findall(
            r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[\d+, (\d+)\]", ttgir, re.M
        )
    }
    narrow = 0
    for _, bits, layout in re.findall(
        rf"(?:tt\.load|tt\.store|ttg\.async_copy_global_to_local) [^\n]*?{_TILE_PARTS}", ttgir
    ):
        if layout in per_thread and per_thread[layout] * int(bits) < 128:
            narrow += 1
    return narrow


def compile_reports(
    jobs: list[tuple[KernelSpec, str, LaunchConfig]], *, arch: int = 90
) -> list[CompiledReport]:
    """`compile_report` of each (spec, kernel, config). Under TRITON_INTERPRET=1 (where
    Triton's own library functions are interpreted and cannot be compiled) the compiles run
    in one fresh Python process without it."""
    import triton

    if not triton.knobs.runtime.interpret:
        return [_compile(spec, kernel, config, arch) for spec, kernel, config in jobs]
    request = [
        dict(spec=dataclasses.asdict(s), kernel=k, config=dataclasses.asdict(c), arch=arch)
        for s, k, c in jobs
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "codegen.aot"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compile_reports: the compiler process failed:\n{done.stderr[-4000:]}")
    return [CompiledReport(**r) for r in json.loads(done.stdout)]


def compile_report(
    spec: KernelSpec, kernel: str = "fwd", config: LaunchConfig | None = None, *, arch: int = 90
) -> CompiledReport:
    """Compile `spec`'s kernel `kernel` for sm_`arch` (num_warps / num_stages from `config`,
    default LaunchConfig()'s) and report it. Needs only the triton wheel: no GPU and no CUDA
    driver."""
    return compile_reports([(spec, kernel, config or LaunchConfig())], arch=arch)[0]


def _compile(spec: KernelSpec, kernel: str, config: LaunchConfig, arch: int) -> CompiledReport:
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = kernel_source_path(spec, module_of(kernel))
    module_spec = importlib.util.spec_from_file_location(f"_aot_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, kernel_name(spec, kernel))
    unspecialised = {
        i if isinstance(i, int) else fn.arg_names.index(i) for i in fn.do_not_specialize
    }
    signature, attrs = _signature(spec, kernel, unspecialised)
    source = ASTSource(
        fn,
        signature,
        constexprs={"UPCAST": False},
        attrs=attrs,
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    ttgir = compiled.asm["ttgir"]
    registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
    return CompiledReport(
        registers=registers,
        spill_bytes=spills,
        shared_bytes=int(compiled.metadata.shared),
        **tile_access_counts(ttgir),
        ttgir=ttgir,
    )


def tile_access_counts(ttgir: str) -> dict[str, int]:
    """`CompiledReport`'s sync_loop_loads, async_loads and narrow_accesses of a TTGIR text."""
    async_ops = r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local"
    return dict(
        sync_loop_loads=len(re.findall(rf"tt\.load [^\n]*?{_TILE}", _loop_bodies(ttgir))),
        async_loads=len(re.findall(rf"(?:{async_ops}) [^\n]*", ttgir)),
        narrow_accesses=_narrow_accesses(ttgir),
    )


if __name__ == "__main__":  # the worker of compile_reports: JSON jobs on stdin, reports out
    jobs = [
        (KernelSpec(**j["spec"]), j["kernel"], LaunchConfig(**j["config"]), j["arch"])
        for j in json.loads(sys.stdin.read())
    ]
    reports = [_compile(*job) for job in jobs]
    print(json.dumps([dataclasses.asdict(r) for r in reports]))
