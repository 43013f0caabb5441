"""Failures of `sparsify` pinned on the example inputs: wrong shapes named by argument, ints
used as sizes specialised as constants (or reported), never a raw torch exception."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patterns import Dense, VideoGeometry
from runtime import CausalWanModel, WanConfig
from sparsify import CaptureError, sparsify

GEOMETRY = VideoGeometry(16, 1, 16, 16)


class IntHeads(nn.Module):
    """Self-attention whose head count is a forward argument (a size in the graph)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(32, 96)

    def forward(self, x: Tensor, heads: int) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, heads, 32 // heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_an_int_used_as_a_size_is_specialised_as_a_constant():
    model, x = IntHeads().eval(), torch.randn(1, 48, 32)
    module = sparsify(model, (x, 2), Dense(), GEOMETRY, mode="full_sequence")
    assert module.plan.constants == {"heads": 2} and "heads=2 specialised" in str(module.plan)
    assert [r.decision for r in module.plan.rows] == ["rewritten"]
    with torch.no_grad():
        torch.testing.assert_close(module(x, 2), model(x, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="heads: the graph was captured with it specialised to 2"):
        module(x, 4)


class FrameSized(nn.Module):
    """A chunk-form model that uses start_frame as a size (it must stay a runtime input)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 96)

    def forward(self, x, timestep, context, start_frame):
        tokens = x.flatten(2).transpose(1, 2)
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out[:, :, : start_frame + 1]


def test_a_runtime_int_used_as_a_size_is_a_capture_error_naming_it():
    inputs = (torch.randn(1, 4, 3, 4, 4), torch.zeros(1, 3), torch.randn(1, 5, 8), 0)
    with pytest.raises(CaptureError, match=r"example_inputs: the graph's sizes.*'start_frame'"):
        sparsify(FrameSized(), inputs, Dense(), VideoGeometry(16, 3, 16, 16))


def test_wrong_shapes_for_the_reference_model_name_the_input():
    model = CausalWanModel(WanConfig.preset("tiny")).eval()
    context = torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match=r"example_inputs: x is float32\[1, 4, 16, 16\]"):
        sparsify(model, (torch.randn(1, 4, 16, 16), torch.zeros(1, 3), context, 0), Dense())
    with pytest.raises(ValueError, match=r"example_inputs: context is .*expected \[B, L, 32\]"):
        x = torch.randn(1, 4, 3, 16, 16)
        sparsify(model, (x, torch.zeros(1, 3), torch.randn(1, 8, 7), 0), Dense())


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_inputs_any_models_forward_rejects_are_named():
    with pytest.raises(ValueError, match=r"example_inputs: Plain.forward itself fails.*tokens: "):
        sparsify(Plain(), (torch.randn(1, 48, 7),), Dense(), GEOMETRY, mode="full_sequence")
