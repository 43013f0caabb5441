"""render(spec): a complete module, specialised only on structure."""

import ast

import pytest

from codegen.render import call_args, kernel_args, render, runtime_int_args
from codegen.spec import KernelSpec


@pytest.mark.parametrize(
    "spec",
    [
        KernelSpec(),
        KernelSpec(tma=True, scheduled=True, dtype="float32"),
        KernelSpec(paged=False, layout="BHLD", return_lse=False, block_m=64, head_dim=64),
        KernelSpec(tma=True, kv_splits=3),
    ],
    ids=lambda s: s.name,
)
def test_source_is_a_module_of_the_kernel_and_its_merge(spec):
    from codegen.render import KERNELS, kernel_name

    tree = ast.parse(render(spec))
    kernels = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [k.name for k in kernels] == [kernel_name(spec, k) for k in KERNELS["fwd"]]
    assert kernels[0].name == spec.name
    for kernel, fn in zip(KERNELS["fwd"], kernels, strict=True):
        assert "triton.jit" in ast.unparse(fn.decorator_list[0])
        assert [a.arg for a in fn.args.args] == [a.name for a in kernel_args(spec, kernel)] + [
            "UPCAST"
        ]
    assert f"KV_SPLITS = tl.constexpr({spec.kv_splits})" in render(spec)


def test_different_specs_render_different_sources():
    a, b = KernelSpec(), KernelSpec(head_dim=64)
    assert render(a) != render(b)
    assert render(a) == render(KernelSpec())


def test_lengths_are_never_specialised_and_strides_are():
    # Sizes change as the cache grows (a recompile each time otherwise); strides are always
    # multiples of 16 (the launcher copies other tensors), so Triton's divisibility
    # specialisation takes one key and is what vectorises the loads (tests/codegen/test_aot.py).
    for spec in (KernelSpec(), KernelSpec(tma=True)):
        tree = ast.parse(render(spec))
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        deco = fn.decorator_list[0]
        listed = {
            e.value for kw in deco.keywords if kw.arg == "do_not_specialize" for e in kw.value.elts
        }
        names = [a.arg for a in fn.args.args if a.annotation is None]
        sizes = {n for n in names if n.startswith(("num_", "kv_", "max_")) or n == "q_len"}
        strides = {n for n in names if n.startswith("stride_")}
        assert sizes and sizes <= listed
        assert not strides & listed


def test_structure_appears_as_named_constexprs():
    src = render(KernelSpec(block_m=64, block_n=32, q_block=128, head_dim=256, group=3))
    for line in (
        "BLOCK_M = tl.constexpr(64)",
        "BLOCK_N = tl.constexpr(32)",
        "Q_BLOCK = tl.constexpr(128)",
        "HEAD_DIM = tl.constexpr(256)",
        "GROUP = tl.constexpr(3)",
    ):
        assert line in src


def test_rejects_non_spec():
    with pytest.raises(TypeError, match="spec"):
        render({"block_m": 128})


@pytest.mark.parametrize("spec", [KernelSpec(), KernelSpec(tma=True)], ids=lambda s: s.name)
def test_signature_is_rendered_from_the_one_argument_list(spec):
    tree = ast.parse(render(spec))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    names = [a.name for a in kernel_args(spec)]
    assert [a.arg for a in fn.args.args] == [*names, "UPCAST"]
    deco = fn.decorator_list[0]
    [listed] = [kw.value for kw in deco.keywords if kw.arg == "do_not_specialize"]
    assert tuple(e.value for e in listed.elts) == runtime_int_args(spec)


def test_call_args_orders_by_the_list_and_rejects_missing_or_extra_names():
    spec = KernelSpec()
    names = [a.name for a in kernel_args(spec)]
    values = {n: i for i, n in enumerate(reversed(names))}
    assert call_args(spec, values) == [values[n] for n in names]
    with pytest.raises(ValueError, match="call_args"):
        call_args(spec, {n: 0 for n in names[1:]})
    with pytest.raises(ValueError, match="call_args"):
        call_args(spec, {**values, "kv_row_b": 0})


@pytest.mark.parametrize(
    "spec",
    [
        KernelSpec(block_m=32, block_n=16, page_size=32, q_block=64, head_dim=32, group=2),
        KernelSpec(paged=False, layout="BHLD", dtype="float32"),
        KernelSpec(partial=False),
    ],
    ids=lambda s: s.name,
)
def test_backward_module_has_three_kernels_rendered_from_their_lists(spec):
    from codegen.render import KERNELS, kernel_name

    tree = ast.parse(render(spec, "bwd"))
    kernels = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(kernels) == {kernel_name(spec, k) for k in KERNELS["bwd"]}
    for kernel in KERNELS["bwd"]:
        fn = kernels[kernel_name(spec, kernel)]
        assert [a.arg for a in fn.args.args] == [a.name for a in kernel_args(spec, kernel)] + [
            "UPCAST"
        ]
        [listed] = [kw.value for kw in fn.decorator_list[0].keywords]
        assert tuple(e.value for e in listed.elts) == runtime_int_args(spec, kernel)
    assert "Q_SUB = tl.constexpr" in render(spec, "bwd")


def test_backward_sources_differ_from_the_forward_and_reject_unknown_names():
    spec = KernelSpec()
    assert render(spec, "bwd") != render(spec)
    with pytest.raises(ValueError, match="module"):
        render(spec, "bwd_dq")
    with pytest.raises(ValueError, match="kernel"):
        kernel_args(spec, "backward")
