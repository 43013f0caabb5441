"""`sparsify()` on the reference model: plan, dense equivalence of the AR rollout, the
PersistentLocal memory bound, re-export/compile, bad input, and the model left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from patterns import Dense, PersistentLocal, VideoGeometry
from patterns.footprint import evaluate
from runtime import CausalWanModel, EagerRunner, GlobalCache, WanConfig, generate
from runtime.model_config import ATTN_IMPLS
from sparsify import CaptureError, SparsifiedModule, sparsify
from sparsify.ops import PBSA_SITE, bound

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

CONFIG = dict(num_kv_heads=2)  # tiny with GQA: 4 query heads, 2 kv heads of 16 dims
LATENT = (4, 16, 16)


def _model(attn_impl: str = "sdpa") -> CausalWanModel:
    return CausalWanModel(WanConfig.preset("tiny", attn_impl=attn_impl, **CONFIG)).eval()


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 16, 16, generator=generator)
    context = torch.randn(1, 8, 32, generator=generator)
    return (x, torch.full((1, 3), 500.0), context, 0), context


@pytest.fixture(scope="module", params=ATTN_IMPLS)
def sparsified(request):
    model = _model(request.param)
    inputs, context = _inputs()
    return model, sparsify(model, inputs, Dense()), context


@pytest.fixture(scope="module")
def sdpa_module():
    """A fresh sparsified sdpa model, not shared with the parametrized fixture."""
    model = _model()
    inputs, context = _inputs()
    return model, sparsify(model, inputs, Dense()), inputs, context


def test_plan_rewrites_self_and_keeps_cross(sparsified):
    model, module, _ = sparsified
    plan = module.plan
    assert plan.capture == "torch.export" and plan.mode == "cached"
    assert [(r.kind, r.layer, r.decision) for r in plan.rows] == [
        ("self", 0, "rewritten"),
        ("cross", 0, "kept"),
        ("self", 1, "rewritten"),
        ("cross", 1, "kept"),
    ]
    for i, row in enumerate(plan.rewritten):
        assert row.module_path == f"blocks.{i}.self_attn.attn"
        assert row.q_shape == (1, 192, 4, 16) and row.k_shape == row.v_shape == (1, 192, 2, 16)
        assert row.backend == "auto (torch)" and (row.q_block, row.page_size) == (16, 16)
        assert row.reason == f"-> AttentionState[{i}]"
    for row in plan.kept:
        assert "cross-attention" in row.reason and row.k_shape == (1, 8, 2, 16)
    text = str(plan)
    assert "2 rewritten, 2 kept" in text and len(text.splitlines()) == 3 + 1 + 4
    assert len(module.runtime.states) == 2


def test_dense_rollout_equals_the_eager_dense_rollout(sparsified):
    model, module, context = sparsified
    expected = generate(
        EagerRunner(model, GlobalCache()), context, 2, latent_shape=LATENT, progress=False
    )
    got = generate(module, context, 2, latent_shape=LATENT, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_persistent_local_peak_kv_bytes_equal_the_pattern_bound():
    model = _model()
    inputs, context = _inputs()
    pattern = PersistentLocal(persistent_blocks=2, window_frames=6, local_topk=2)
    module = sparsify(model, inputs, pattern, page_size=32, q_block=32)
    out = generate(module, context, 4, latent_shape=LATENT, progress=False)
    assert torch.isfinite(out).all()
    geometry = VideoGeometry(64, 3, 32, 32)
    bound = evaluate(
        pattern.footprint().peak_bound_bytes(), geometry, num_layers=2, batch_size=1,
        kv_heads=2, dim=16, element_bytes=4,
    )  # fmt: skip
    assert module.peak_kv_bytes == bound
    assert module.plan.rewritten[0].page_size == 32


def test_model_is_left_untouched():
    model = _model()
    inputs, _ = _inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, id(m)) for name, m in model.named_modules()]
    with torch.no_grad():
        before = model(*inputs)
    module = sparsify(model, inputs, Dense())
    module.to(torch.float64)  # must not reach the model's parameters
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert not {id(m) for m in model.modules()} & {id(m) for m in module.modules()}
    assert not {id(p) for p in model.parameters()} & {id(p) for p in module.parameters()}
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key])
    with torch.no_grad():
        assert torch.equal(model(*inputs), before)


def test_state_dict_holds_the_learned_gates(sdpa_module):
    _, module, _, _ = sdpa_module
    keys = module.state_dict().keys()
    assert {"runner.runtime.states.0.scorer.wq", "runner.runtime.states.1.scorer.wk"} <= keys
    assert "graph_module.blocks.0.self_attn.q.weight" in keys


def test_deep_copy_gets_its_own_attention_states(sdpa_module):
    model, module, inputs, context = sdpa_module
    clone = copy.deepcopy(module)
    calls = [n.args[3] for n in clone.graph_module.graph.nodes if n.target is PBSA_SITE]
    assert calls == list(clone.site_ids.values())
    assert not set(calls) & set(module.site_ids.values())
    assert [bound(i) for i in calls] == list(clone.runtime.states)
    expected = generate(module, context, 1, latent_shape=LATENT, progress=False)
    torch.testing.assert_close(
        generate(clone, context, 1, latent_shape=LATENT, progress=False), expected
    )
    assert clone.runtime.committed_frames == module.runtime.committed_frames == 3


def test_rewritten_graph_exports_and_compiles(sdpa_module):
    model, module, inputs, context = sdpa_module
    x, timestep, ctx, _ = inputs
    program = torch.export.export(module.graph_module, (x, timestep, ctx, torch.tensor(0)))
    calls = [n for n in program.graph.nodes if "pbsa_site" in str(n.target)]
    assert len(calls) == 2
    module.compile(backend="aot_eager", fullgraph=True)  # inductor is too slow for CPU CI
    expected = generate(EagerRunner(model), context, 1, latent_shape=LATENT, progress=False)
    got = generate(module, context, 1, latent_shape=LATENT, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dense_mask_leaves_every_self_site_dense_in_full_sequence_mode():
    model = _model()
    (x, timestep, context, _), _ = _inputs()
    mask = torch.rand(192, 192) > 0.5
    with pytest.raises(ValueError, match="(?s)no self-attention site can be rewritten.*attn_mask"):
        sparsify(model, (x, timestep, context, 0, mask), Dense(), mode="full_sequence")
    module = sparsify(
        model, (x, timestep, context, 0, mask), Dense(), mode="full_sequence", allow_dense=True
    )  # fmt: skip
    assert module.plan.rewritten == []
    assert all("attn_mask" in r.reason for r in module.plan.rows if r.kind == "self")
    with torch.no_grad():
        torch.testing.assert_close(
            module(x, timestep, context, 0, mask), model(x, timestep, context, 0, mask)
        )
    with pytest.raises(RuntimeError, match="no KV cache"):
        module.reset(1, "cpu", torch.float32, 3)


def test_geometry_mismatch_is_an_error_in_cached_mode():
    inputs, _ = _inputs()
    with pytest.raises(ValueError, match="geometry: tokens_per_frame=32.*8x8 = 64"):
        sparsify(_model(), inputs, Dense(), geometry=VideoGeometry(32, 3))
    # 32 tokens x 6 frames is one chunk of 192 tokens too, but not the model's frames.
    with pytest.raises(ValueError, match="geometry: tokens_per_frame=32"):
        sparsify(_model(), inputs, Dense(), geometry=VideoGeometry(32, 6))
    with pytest.raises(ValueError, match="geometry: frames_per_chunk=1"):
        sparsify(_model(), inputs, Dense(), geometry=VideoGeometry(64, 1))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).softmax(-1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_bad_input_is_reported_clearly():
    geometry = VideoGeometry(4, 1)
    x = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="no attention found"):
        sparsify(NoAttention(), (x,), Dense(), geometry, mode="full_sequence")
    model = Branchy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError, match="(?s)torch.export.*dynamo.*fx.symbolic_trace"):
        sparsify(model, (x,), Dense(), geometry, mode="full_sequence")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    inputs, _ = _inputs()
    with pytest.raises(TypeError, match="pattern"):
        sparsify(_model(), inputs, "dense")
    with pytest.raises(ValueError, match="backend"):
        sparsify(_model(), inputs, Dense(), backend="cuda")
    with pytest.raises(TypeError, match="options"):
        sparsify(_model(), inputs, Dense(), window=3)
    with pytest.raises(ValueError, match="mode"):
        sparsify(_model(), inputs, Dense(), mode="causal")
    with pytest.raises(ValueError, match="geometry: required"):
        sparsify(NoAttention(), (x,), Dense(), mode="full_sequence")
    with pytest.raises(ValueError, match="4-tuple"):
        sparsify(_model(), {"x": inputs[0]}, Dense())
    with pytest.raises(TypeError, match="autotune"):
        sparsify(_model(), inputs, Dense(), autotune="yes")
    with pytest.raises(ValueError, match="autotune"):
        sparsify(NoAttention(), (x,), Dense(), geometry, mode="full_sequence", autotune=True)


def test_autotune_option_reaches_the_runtime():
    inputs, _ = _inputs()
    assert sparsify(_model(), inputs, Dense()).runtime.autotune is True
    module = sparsify(_model(), inputs, Dense(), autotune=False)
    assert module.runtime.autotune is False
    with pytest.raises(TypeError, match="autotune"):
        module.runtime.autotune = 1


def test_is_a_sparsified_module_and_a_runner(sdpa_module):
    from runtime import ChunkRunner

    _, module, inputs, _ = sdpa_module
    assert isinstance(module, SparsifiedModule) and isinstance(module, ChunkRunner)
    with pytest.raises(ValueError, match="start_frame"):
        module.reset(1, "cpu", torch.float32, 6)
        module(*inputs[:3], 3, commit=False)  # chunks come in order
