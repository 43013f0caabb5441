"""Capture: each path, ints as runtime inputs, the combined error, the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sparsify.capture import CAPTURE_METHODS, CaptureError, capture, runtime_inputs


class Offset(nn.Module):
    """Uses an int input arithmetically (like start_frame indexing a RoPE table)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(32.0).view(8, 4))

    def forward(self, x: Tensor, start: int | Tensor) -> Tensor:
        rows = torch.arange(2) + start
        return self.lin(x) + self.table[rows]


@pytest.mark.parametrize("method", CAPTURE_METHODS)
def test_each_path_captures_and_keeps_int_inputs_at_runtime(method):
    model = Offset()
    x = torch.randn(2, 4)
    captured = capture(model, (x, 1), methods=(method,))
    assert captured.method == method and captured.failures == []
    assert isinstance(captured.args[1], Tensor) and captured.args[1].dtype == torch.int64
    gm = captured.graph_module
    assert all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function"))
    for start in (1, 5):  # one graph, reused for every value
        torch.testing.assert_close(gm(x, torch.tensor(start)), model(x, start))


def test_runtime_inputs_converts_ints_not_bools():
    args, kwargs = runtime_inputs((3, True, 2.0), {"n": 4, "flag": False})
    assert isinstance(args[0], Tensor) and args[0].dtype == torch.int64 and int(args[0]) == 3
    assert args[1] is True and args[2] == 2.0
    assert isinstance(kwargs["n"], Tensor) and kwargs["flag"] is False


class Branchy(nn.Module):
    """Python control flow on tensor values: no capture path can keep it as one graph."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_untraceable_control_flow_lists_every_attempt_and_leaves_the_model():
    model = Branchy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [id(m) for m in model.modules()]
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 4),))
    message = str(info.value)
    for method in CAPTURE_METHODS:
        assert f"- {method}:" in message
    assert modules == [id(m) for m in model.modules()]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_captured_module_owns_its_objects_but_shares_storage():
    model = Offset()
    gm = capture(model, (torch.randn(2, 4), 0)).graph_module
    model_params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    gm_params = {id(p) for p in gm.parameters()} | {id(b) for b in gm.buffers()}
    assert not model_params & gm_params
    assert not {id(m) for m in model.modules()} & {id(m) for m in gm.modules()}
    pointers = {p.data_ptr() for p in model.parameters()}
    assert pointers <= {p.data_ptr() for p in gm.parameters()}
    gm.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(ValueError, match="methods"):
        capture(Offset(), (torch.randn(2, 4), 0), methods=("jit",))
