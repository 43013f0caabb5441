"""`sparsify()` on diffusers' WanTransformer3DModel (bidirectional: full-sequence mode), CPU.

Its attention processor goes through `dispatch_attention_fn`; under torch.export that becomes
aten `scaled_dot_product_attention` in the graph, which is what the pass matches.
"""

from __future__ import annotations

import pytest
import torch

from patterns import Dense, PersistentLocal, VideoGeometry
from sparsify import sparsify

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip
GEOMETRY = VideoGeometry(tokens_per_frame=16, frames_per_chunk=1, page_size=16, q_block=16)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**CONFIG).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "return_dict": False,
    }
    with torch.no_grad():
        expected = model(**inputs)[0]
    module = sparsify(model, inputs, Dense(), GEOMETRY, mode="full_sequence")
    return model, module, inputs, expected


def test_attn1_rewritten_attn2_kept(wan):
    _, module, _, _ = wan
    plan = module.plan
    assert plan.capture == "torch.export"
    rows = [(r.module_path, r.kind, r.decision) for r in plan.rows]
    assert rows == [
        ("blocks.0.attn1", "self", "rewritten"),
        ("blocks.0.attn2", "cross", "kept"),
        ("blocks.1.attn1", "self", "rewritten"),
        ("blocks.1.attn2", "cross", "kept"),
    ]
    assert plan.rewritten[0].q_shape == (1, 48, 2, 16)
    assert plan.kept[0].k_shape == (1, 5, 2, 16)
    assert len(module.attention) == 2


def test_keeping_every_block_reproduces_the_model(wan):
    _, module, inputs, expected = wan
    with torch.no_grad():
        got = module(**inputs)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sparse_pattern_changes_the_output(wan):
    model, _, inputs, expected = wan
    pattern = PersistentLocal(persistent_blocks=0, window_frames=1, local_topk=1, radius_frames=0)
    module = sparsify(model, inputs, pattern, GEOMETRY, mode="full_sequence")
    with torch.no_grad():
        got = module(**inputs)[0]
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, expected, atol=1e-4)


def test_rewritten_module_exports_again_and_compiles(wan):
    model, _, inputs, expected = wan
    module = sparsify(model, inputs, Dense(), GEOMETRY, mode="full_sequence")
    program = torch.export.export(module, (), inputs)
    assert sum("pbsa_site" in str(n.target) for n in program.graph.nodes) == 2
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
    # aot_eager traces through the custom op's fake kernel; inductor takes ~45 s on CPU.
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], expected, atol=1e-5, rtol=1e-5)


def test_original_model_untouched(wan):
    model, module, inputs, expected = wan
    assert not {id(p) for p in model.parameters()} & {id(p) for p in module.parameters()}
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected)


def test_geometry_that_is_not_the_models_frame_size_is_an_error(wan):
    model, _, inputs, _ = wan
    # 8 divides the 48 tokens, but 8x8 latents in 2x2 patches are frames of 16 tokens.
    geometry = VideoGeometry(tokens_per_frame=8, frames_per_chunk=1, page_size=16, q_block=16)
    with pytest.raises(ValueError, match="geometry: tokens_per_frame=8.*4x4 = 16"):
        sparsify(model, inputs, Dense(), geometry, mode="full_sequence")


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("hidden_states", (1, 4, 8, 8), r"hidden_states is float32\[1, 4, 8, 8\]; expected \[B, 4"),
        ("hidden_states", (1, 4, 3, 8, 7), r"hidden_states .*multiples of the patch \(1, 2, 2\)"),
        ("encoder_hidden_states", (1, 5, 16), r"encoder_hidden_states .*expected \[B, L, 32\]"),
    ],
)
def test_wrong_shaped_inputs_are_named(wan, name, shape, message):
    model, _, inputs, _ = wan
    inputs = {**inputs, name: torch.randn(shape)}
    with pytest.raises(ValueError, match=f"example_inputs: {message}"):
        sparsify(model, inputs, Dense(), GEOMETRY, mode="full_sequence")
