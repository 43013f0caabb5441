"""The reference CausalWanModel: structure, attention spellings, export, validation."""

import dataclasses

import pytest
import torch
from torch import nn

from runtime.model import CausalWanModel
from runtime.model_config import WanConfig, wan_parameter_count

# Eager flex_attention on CPU is the intended "flex" spelling here, not a missed compile.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

IMPLS = ("sdpa", "sdpa_kw", "unfused", "flex")


def _inputs(cfg: WanConfig, batch=2, chunks=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = chunks * cfg.frames_per_chunk
    x = torch.randn(
        batch, cfg.in_channels, frames, cfg.latent_height, cfg.latent_width, generator=g
    )
    t = torch.rand(batch, frames, generator=g) * 1000
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- presets and size ---------------------------------------------------------------------------


def test_tiny_presets_geometry():
    assert WanConfig.preset("tiny").tokens_per_frame == 64
    mis = WanConfig.preset("tiny_misaligned")
    assert mis.tokens_per_frame == 35 and (mis.grid_height, mis.grid_width) == (5, 7)


def test_wan_1_3b_on_meta_device():
    cfg = WanConfig.preset("wan2.1-1.3b")
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    assert cfg.tokens_per_frame == 1560
    assert (cfg.latent_height * 8, cfg.latent_width * 8) == (480, 832)
    assert len(model.blocks) == 30
    attn = model.blocks[0].self_attn
    assert (attn.num_heads, cfg.head_dim) == (12, 128)
    count = _num_params(model)
    print(f"wan2.1-1.3b parameters: {count:,}")
    assert count == wan_parameter_count(cfg)
    assert 1.2e9 < count < 1.5e9


@pytest.mark.parametrize(
    "overrides", [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1, "num_layers": 3, "ffn_dim": 96}]
)
def test_parameter_count_formula(overrides):
    cfg = WanConfig.preset("tiny", **overrides)
    assert _num_params(CausalWanModel(cfg)) == wan_parameter_count(cfg)


def test_seeded_init_is_deterministic_and_nontrivial():
    a, b = CausalWanModel(WanConfig.preset("tiny")), CausalWanModel(WanConfig.preset("tiny"))
    c = CausalWanModel(WanConfig.preset("tiny", seed=1))
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    assert a.head.head.weight.abs().min() > 0


# -- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny_misaligned"])
def test_forward_shape_and_broadcast_timestep(preset):
    cfg = WanConfig.preset(preset)
    model = CausalWanModel(cfg)
    x, t, ctx = _inputs(cfg, chunks=2)
    out = model(x, t, ctx, 0)
    assert out.shape == (2, cfg.out_channels, 6, cfg.latent_height, cfg.latent_width)
    assert torch.isfinite(out).all()
    per_frame = t[:, :1].expand(-1, 6).contiguous()
    torch.testing.assert_close(model(x, t[:, 0], ctx, 0), model(x, per_frame, ctx, 0))


def test_timestep_is_per_frame():
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg)
    x, t, ctx = _inputs(cfg)
    t2 = t.clone()
    t2[:, 1] += 100
    assert not torch.allclose(model(x, t, ctx, 0), model(x, t2, ctx, 0))


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_spellings_agree(kv_heads, masked):
    base = WanConfig.preset("tiny", num_kv_heads=kv_heads)
    x, t, ctx = _inputs(base, chunks=2)
    mask = None
    if masked:
        frame = torch.arange(6 * base.tokens_per_frame) // base.tokens_per_frame
        mask = (frame[None, :] // 3) <= (frame[:, None] // 3)
    outs = {
        impl: CausalWanModel(dataclasses.replace(base, attn_impl=impl))(
            x, t, ctx, 0, attn_mask=mask
        )
        for impl in IMPLS
    }
    for impl in IMPLS[1:]:
        torch.testing.assert_close(outs[impl], outs["sdpa"], atol=1e-5, rtol=1e-5)
    if masked:
        unmasked = CausalWanModel(base)(x, t, ctx, 0)
        assert not torch.allclose(unmasked, outs["sdpa"], atol=1e-3)


class _Zero(nn.Module):
    def forward(self, q, k, v, attn_mask=None):
        return torch.zeros_like(q)


@pytest.mark.parametrize("site", ["self_attn", "cross_attn"])
def test_attention_influences_output(site):
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg)
    x, t, ctx = _inputs(cfg)
    ref = model(x, t, ctx, 0)
    with torch.no_grad():
        getattr(model.blocks[1], site).q.weight.mul_(3.0)
    scaled = model(x, t, ctx, 0)
    assert (scaled - ref).abs().max() > 1e-3
    getattr(model.blocks[0], site).attn = _Zero()
    assert (model(x, t, ctx, 0) - scaled).abs().max() > 1e-3


def test_attention_submodule_gets_blhd():
    cfg = WanConfig.preset("tiny", num_kv_heads=2)
    model = CausalWanModel(cfg)
    seen = {}

    class Spy(nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self.inner, self.name = inner, name

        def forward(self, q, k, v, attn_mask=None):
            seen[self.name] = (q.shape, k.shape, v.shape)
            return self.inner(q, k, v)

    for name in ("self_attn", "cross_attn"):
        site = getattr(model.blocks[0], name)
        site.attn = Spy(site.attn, name)
    x, t, ctx = _inputs(cfg, batch=1)
    model(x, t, ctx, 0)
    n = 3 * cfg.tokens_per_frame
    assert seen["self_attn"] == ((1, n, 4, 16), (1, n, 2, 16), (1, n, 2, 16))
    assert seen["cross_attn"] == ((1, n, 4, 16), (1, cfg.text_len, 2, 16), (1, cfg.text_len, 2, 16))


def test_chunk_form_is_invariant_to_a_global_frame_shift():
    # RoPE is relative: shifting every frame of one attention window changes nothing.
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg)
    x, t, ctx = _inputs(cfg)
    torch.testing.assert_close(model(x, t, ctx, 0), model(x, t, ctx, 500), atol=1e-4, rtol=1e-4)
    assert torch.equal(model(x, t, ctx, torch.tensor(7)), model(x, t, ctx, 7))


def test_frame_positions_place_each_frame():
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg).eval()
    for block in model.blocks:  # per-token model whose output shows the keys' RoPE positions
        block.self_attn.attn = _Keys()
    x, t, ctx = _inputs(cfg, batch=1, chunks=2)
    with torch.no_grad():
        default = model(x, t, ctx, 4)
        assert torch.equal(model(x, t, ctx, 0, frame_positions=torch.arange(4, 10)), default)
        # repeated positions (teacher forcing): frames 3-5 at the positions of frames 0-2
        repeated = model(x, t, ctx, 0, frame_positions=torch.arange(3).repeat(2))
        chunk_at_0 = model(x[:, :, 3:], t[:, 3:], ctx, 0)
    assert (default - model(x, t, ctx, 0)).abs().max() > 1e-2
    torch.testing.assert_close(repeated[:, :, 3:], chunk_at_0, atol=1e-5, rtol=1e-5)


def test_bad_frame_positions(tiny):
    x, t, ctx = _inputs(tiny.config, batch=1)
    for positions, message in [
        (torch.arange(2), r"shape \[F\]=\(3,\)"),
        (torch.arange(3.0), "integer tensor"),
        ([0, 1, 2], "integer tensor"),
        (torch.tensor([0, 1, 1024]), r"\[0, 1024\)"),
        (torch.tensor([-1, 0, 1]), r"\[0, 1024\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny(x, t, ctx, 0, frame_positions=positions)


# -- export ------------------------------------------------------------------------------------


def test_export_has_one_sdpa_per_attention():
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg).eval()
    x, t, ctx = _inputs(cfg, batch=1)
    ep = torch.export.export(model, (x, t, ctx, torch.tensor(0)), strict=False)
    sdpa = [
        n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
    ]
    assert len(sdpa) == 2 * cfg.num_layers
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, t, ctx, torch.tensor(4)), model(x, t, ctx, 4))


class _Keys(nn.Module):
    """Returns the rotated keys: makes the absolute RoPE position visible in the output."""

    def forward(self, q, k, v, attn_mask=None):
        return k


def test_export_keeps_start_frame_a_runtime_input():
    cfg = WanConfig.preset("tiny")
    model = CausalWanModel(cfg).eval()
    model.blocks[0].self_attn.attn = _Keys()
    x, t, ctx = _inputs(cfg, batch=1)
    ep = torch.export.export(model, (x, t, ctx, torch.tensor(0)), strict=False)
    run = ep.module()
    with torch.no_grad():
        at0, at9 = run(x, t, ctx, torch.tensor(0)), run(x, t, ctx, torch.tensor(9))
        torch.testing.assert_close(at9, model(x, t, ctx, 9))
        torch.testing.assert_close(at0, model(x, t, ctx, 0))
    assert (at9 - at0).abs().max() > 1e-2


# -- validation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return CausalWanModel(WanConfig.preset("tiny"))


def test_bad_inputs(tiny):
    cfg = tiny.config
    x, t, ctx = _inputs(cfg, batch=1)
    cases = [
        ((x[0], t, ctx, 0), "x must be a 5-D"),
        ((x[:, :3], t, ctx, 0), "in_channels"),
        ((x[..., :8], t, ctx, 0), "latent size"),
        ((x[:, :, :2], t[:, :2], ctx, 0), "multiple of frames_per_chunk"),
        ((x, t, ctx, 1022), "RoPE table"),
        ((x, t, ctx, torch.tensor(1022)), "RoPE table"),
        ((x, t, ctx, -1), "RoPE table"),
        ((x, t, ctx, torch.tensor([0])), "0-dim integer"),
        ((x, t, ctx, torch.tensor(0.0)), "0-dim integer"),
        ((x, t, ctx[..., :16], 0), "text_dim"),
        ((x, t, ctx.expand(2, -1, -1), 0), "batch"),
        ((x, t, ctx[0], 0), "context must be a 3-D"),
        ((x, t[:, :2], ctx, 0), "timestep must have shape"),
        ((x, t[None], ctx, 0), "timestep must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny(*args)
    with pytest.raises(TypeError, match="start_frame"):
        tiny(x, t, ctx, 1.0)


def test_bad_attn_mask(tiny):
    x, t, ctx = _inputs(tiny.config, batch=1)
    n = 3 * tiny.config.tokens_per_frame
    with pytest.raises(ValueError, match="bool"):
        tiny(x, t, ctx, 0, attn_mask=torch.ones(n, n))
    with pytest.raises(ValueError, match="broadcastable"):
        tiny(x, t, ctx, 0, attn_mask=torch.ones(n, n - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcastable"):
        tiny(x, t, ctx, 0, attn_mask=torch.ones(3, n, n, dtype=torch.bool))


def test_chunk_form_validation(tiny):
    x, t, ctx = _inputs(tiny.config, batch=1, chunks=2)
    with pytest.raises(ValueError, match="exactly frames_per_chunk"):
        tiny.forward_cached(x, t, ctx, 0, [None, None])
    with pytest.raises(ValueError, match="one slot per layer"):
        tiny.forward_cached(x[:, :, :3], t[:, :3], ctx, 0, [None])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attn_impl": "xformers"}, "attn_impl"),
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"latent_height": 15}, "latent_height"),
        ({"dim": 0}, "dim"),
        ({"frames_per_chunk": 0}, "frames_per_chunk"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        WanConfig.preset("tiny", **overrides)


def test_bad_preset():
    with pytest.raises(ValueError, match="preset name"):
        WanConfig.preset("wan2.2")
    with pytest.raises(TypeError, match="unknown overrides"):
        WanConfig.preset("tiny", heads=3)
    with pytest.raises(TypeError, match="WanConfig"):
        CausalWanModel({"dim": 64})
