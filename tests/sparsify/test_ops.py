"""`sparse_forcing::pbsa_site`: binding, dispatch to the bound module, fake kernel, errors."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from sparsify.ops import PBSA_SITE, bind, bound


class Recorder(nn.Module):
    def __init__(self, alias: bool = False):
        super().__init__()
        self.alias = alias
        self.seen = []

    def forward(self, q, k, v):
        self.seen.append((q.shape, k.shape, v.shape))
        return q if self.alias else q * 2 + v.sum()


def test_op_calls_the_bound_module_and_ids_are_distinct():
    first, second = Recorder(), Recorder()
    a, b = bind(first), bind(second)
    assert a != b and bound(a) is first and bound(b) is second
    q, kv = torch.randn(1, 6, 4, 16), torch.randn(1, 6, 2, 16)
    out = torch.ops.sparse_forcing.pbsa_site(q, kv, kv, b)
    torch.testing.assert_close(out, q * 2 + kv.sum())
    assert first.seen == [] and second.seen == [(q.shape, kv.shape, kv.shape)]


def test_output_never_aliases_an_input():
    q, module = torch.randn(1, 6, 2, 16), Recorder(alias=True)
    out = PBSA_SITE(q, q, q, bind(module))
    assert torch.equal(out, q) and out.data_ptr() != q.data_ptr()


def test_fake_kernel_gives_the_output_shape_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = Recorder()
    site = bind(module)
    with FakeTensorMode():
        q, kv, v = torch.empty(2, 9, 4, 16), torch.empty(2, 9, 2, 16), torch.empty(2, 9, 2, 8)
        out = PBSA_SITE(q, kv, v, site)
    assert tuple(out.shape) == (2, 9, 4, 8)
    assert module.seen == []


def test_bindings_are_weak_and_a_dead_id_fails_clearly():
    module = Recorder()
    site = bind(module)
    del module
    gc.collect()
    with pytest.raises(RuntimeError, match=f"site_id {site} is not bound"):
        PBSA_SITE(
            torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), site
        )


def test_bind_rejects_non_modules():
    with pytest.raises(TypeError, match="module"):
        bind(lambda q, k, v: q)
