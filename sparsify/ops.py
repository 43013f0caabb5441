"""`torch.ops.sparse_forcing.pbsa_site`: the op a rewritten self-attention site calls.

The op takes BLHD q [B, Lq, H, D] and k, v [B, Lk, Hkv, D] plus an integer `site_id` and
returns [B, Lq, H, Dv] from the attention module bound to that id (a `runtime.AttentionState`
in the AR rollout, a `runtime.FullSequenceAttention` for bidirectional models). Bindings are
weak: the `SparsifiedModule` owns its attention modules, and a graph that outlives them fails
with a clear error instead of keeping them alive. The fake implementation lets the rewritten
graph be exported and compiled again.

Autograd: the backward is ``sparse_forcing::pbsa_site_backward`` (an op of its own, so that a
compiled training step traces it through its fake implementation), which asks the bound
module's ``site_backward(q, k, v, out, grad_out) -> (dq, dk, dv)``. A module without one (the
cached rollout's `runtime.AttentionState`, whose KV cache is state) makes backward fail
with a clear error; gradients never flow into past cache entries.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

_BINDINGS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def bind(module: nn.Module) -> int:
    """Register `module` (called as module(q, k, v)) under a fresh site id; returns the id."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    site_id = next(_NEXT_ID)
    _BINDINGS[site_id] = module
    return site_id


def bound(site_id: int) -> nn.Module:
    """The module bound to `site_id`."""
    module = _BINDINGS.get(site_id)
    if module is None:
        raise RuntimeError(
            f"sparse_forcing.pbsa_site: site_id {site_id} is not bound (the SparsifiedModule "
            "that owned its attention state was deleted)"
        )
    return module


@torch.library.custom_op("sparse_forcing::pbsa_site", mutates_args=())
def pbsa_site(q: Tensor, k: Tensor, v: Tensor, site_id: int) -> Tensor:
    """Attention of one rewritten site: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (BLHD) →
    [B, Lq, H, Dv], computed by the module bound to `site_id` (which owns any KV cache)."""
    out = bound(site_id)(q, k, v)
    # A custom op's output may not alias its inputs.
    storages = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    return out.clone() if out.untyped_storage().data_ptr() in storages else out


@pbsa_site.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, site_id: int) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("sparse_forcing::pbsa_site_backward", mutates_args=())
def pbsa_site_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, site_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one rewritten site, from the module bound to `site_id`."""
    module = bound(site_id)
    backward = getattr(module, "site_backward", None)
    if backward is None:
        raise RuntimeError(
            f"sparse_forcing.pbsa_site: site {site_id} is bound to a "
            f"{type(module).__name__}, which has no site_backward: it is not differentiable"
        )
    return tuple(g.contiguous() for g in backward(q, k, v, out, grad_out))


@pbsa_site_backward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, site_id: int):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, v, site_id = inputs
    ctx.save_for_backward(q, k, v, output)
    ctx.site_id = site_id


def _backward(ctx, grad_out: Tensor) -> tuple:
    q, k, v, out = ctx.saved_tensors
    return (*pbsa_site_backward(q, k, v, out, grad_out, ctx.site_id), None)


pbsa_site.register_autograd(_backward, setup_context=_setup_context)

PBSA_SITE: Callable[..., Tensor] = torch.ops.sparse_forcing.pbsa_site.default
