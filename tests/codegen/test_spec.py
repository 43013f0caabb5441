"""KernelSpec validation and identity."""

import dataclasses

import pytest

from codegen.spec import KernelSpec


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(head_dim=96), "head_dim"),
        (dict(head_dim=512), "head_dim"),
        (dict(head_dim=8), "head_dim"),
        (dict(block_m=48), "block_m"),
        (dict(block_n=8), "block_n"),
        (dict(block_n=64, page_size=32), "block_n"),
        (dict(page_size=24), "page_size"),
        (dict(block_m=256, q_block=128), "block_m"),
        (dict(group=0), "group"),
        (dict(dtype="float64"), "dtype"),
        (dict(layout="BSHD"), "layout"),
        (dict(paged=1), "paged"),
        (dict(warp_specialize=True), "warp_specialize"),
        (dict(kv_splits=0), "kv_splits"),
        (dict(kv_splits=9), "kv_splits"),
        (dict(kv_splits=True), "kv_splits"),
    ],
)
def test_invalid_specs_name_the_field(change, field):
    with pytest.raises((ValueError, TypeError), match=f"KernelSpec.{field}"):
        KernelSpec(**change)


def test_spec_is_frozen_and_hashable():
    spec = KernelSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.block_m = 64
    assert len({spec, KernelSpec()}) == 1


def test_every_field_changes_name_and_digest():
    base = KernelSpec()
    variants = [
        dict(block_m=64),
        dict(block_n=64),
        dict(q_block=256),
        dict(head_dim=64),
        dict(group=2),
        dict(dtype="float16"),
        dict(layout="BHLD"),
        dict(paged=False),
        dict(partial=False),
        dict(return_lse=False),
        dict(tma=True),
        dict(tma=True, scheduled=True),
        dict(scheduled=True),
        dict(tma=True, warp_specialize=True),
        dict(kv_splits=2),
    ]
    names = {base.name} | {dataclasses.replace(base, **v).name for v in variants}
    digests = {base.digest()} | {dataclasses.replace(base, **v).digest() for v in variants}
    assert len(names) == len(digests) == len(variants) + 1
    assert base.digest("template a") != base.digest("template b")
