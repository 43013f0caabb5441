"""`runtime.load_causal_wan`: tiny checkpoints written as each project saves them load into a
model whose output equals the source's; broken checkpoints are errors naming the culprit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from runtime import CausalWanModel, CheckpointError, WanConfig, load_causal_wan

CONFIG = WanConfig.preset("tiny")


def _inputs(config: WanConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(
        1, config.in_channels, 3, config.latent_height, config.latent_width, generator=g
    )
    context = torch.randn(1, config.text_len, config.text_dim, generator=g)
    return x, torch.tensor([[900.0, 500.0, 100.0]]), context


def _out(model, config=CONFIG):
    with torch.no_grad():
        return model(*_inputs(config), 3)


@pytest.fixture(scope="module")
def models():
    """The generator and its (different) EMA copy."""
    return (
        CausalWanModel(CONFIG).eval(),
        CausalWanModel(WanConfig.preset("tiny", seed=1)).eval(),
    )


def _fsdp(name: str) -> str:
    # FSDP wraps the model and each block: model._fsdp_wrapped_module.blocks.0._fsdp_...
    name = name.replace("blocks.", "_fsdp_wrapped_module.blocks.", 1)
    parts = name.split(".")
    if "blocks" in parts:
        at = parts.index("blocks") + 2
        parts.insert(at, "_fsdp_wrapped_module")
    return ".".join(parts)


def _self_forcing(path, generator, ema):
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in generator.state_dict().items()},
            "critic": {"model.head.head.weight": torch.zeros(3, 3)},
            "generator_ema": {f"model.{_fsdp(k)}": v for k, v in ema.state_dict().items()},
        },
        path,
    )


def test_self_forcing_checkpoint_prefers_ema(tmp_path, models):
    generator, ema = models
    path = tmp_path / "self_forcing_dmd.pt"
    _self_forcing(path, generator, ema)
    assert torch.equal(_out(load_causal_wan(path, CONFIG)), _out(ema))
    assert torch.equal(_out(load_causal_wan(path, CONFIG, ema=False)), _out(generator))


def test_causvid_checkpoint_without_ema(tmp_path, models):
    generator, _ = models
    path = tmp_path / "model.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in generator.state_dict().items()}}, path)
    model = load_causal_wan(path, CONFIG)
    assert torch.equal(_out(model), _out(generator))
    assert model.rope.frame_cos.device.type == "cpu" and not model.training


def test_wan_release_folder_with_config_json(tmp_path, models):
    generator, _ = models
    save_file(generator.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    wan_config = {
        "_class_name": "WanModel", "model_type": "t2v", "dim": 64, "num_heads": 4,
        "num_layers": 2, "ffn_dim": 128, "freq_dim": 256, "in_dim": 4, "out_dim": 4,
        "text_len": 8, "eps": 1e-6, "patch_size": [1, 2, 2],
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(wan_config))
    model = load_causal_wan(tmp_path, {"text_dim": 32, "latent_height": 16, "latent_width": 16})
    assert model.config == CONFIG
    assert torch.equal(_out(model), _out(generator))


def test_dtype_and_inferred_fields(tmp_path, models):
    generator, _ = models
    save_file(
        {k: v.bfloat16() for k, v in generator.state_dict().items()}, tmp_path / "w.safetensors"
    )
    model = load_causal_wan(tmp_path / "w.safetensors", {"num_heads": 4})
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (model.config.dim, model.config.num_layers, model.config.text_dim) == (64, 2, 32)
    assert model.config.text_len == 512  # not in the weights: the wan2.1-1.3b preset's
    model = load_causal_wan(tmp_path / "w.safetensors", {"num_heads": 4}, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32


# -- diffusers --------------------------------------------------------------------------------

DIFFUSERS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip
FIELDS = {"latent_height": 8, "latent_width": 8, "text_len": 5}


@pytest.fixture(scope="module")
def wan_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**DIFFUSERS).eval()
    with torch.no_grad():  # no parameter at its init value (norms at 1, tables at 0)
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("shard", [None, "30KB"], ids=["single", "sharded"])
def test_diffusers_folder_matches_diffusers_forward(tmp_path, wan_transformer, shard):
    kwargs = {} if shard is None else {"max_shard_size": shard}
    wan_transformer.save_pretrained(tmp_path, **kwargs)
    assert (shard is None) != any(tmp_path.glob("*.index.json"))
    model = load_causal_wan(tmp_path, FIELDS)
    assert (model.config.dim, model.config.num_heads, model.config.rope_positions) == (32, 2, 32)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        expected = wan_transformer(x, t, context, return_dict=False)[0]
        got = model(x, t, context, 0)
    # float32 tolerance: diffusers computes the timestep sinusoid in float32, ours in float64
    # (at t = 700 the angles differ by ~1e-5 rad); a wrong mapping differs by O(1).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_diffusers_state_dict_and_pipeline_folder(tmp_path, wan_transformer):
    save_file(dict(wan_transformer.state_dict()), tmp_path / "t.safetensors")
    flat = load_causal_wan(tmp_path / "t.safetensors", {"num_heads": 2, **FIELDS})
    wan_transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    folder = load_causal_wan(tmp_path / "pipe", FIELDS)
    assert torch.equal(_out(flat, flat.config), _out(folder, folder.config))


def test_diffusers_variant_the_model_lacks_is_named(tmp_path, wan_transformer):
    wan_transformer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "added_kv_proj_dim": 32}))
    with pytest.raises(CheckpointError, match="added_kv_proj_dim"):
        load_causal_wan(tmp_path, FIELDS)


# -- LoRA -------------------------------------------------------------------------------------

TARGETS = ("blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.0")


def _lora_pairs(model, rank=4):
    g = torch.Generator().manual_seed(5)
    modules = dict(model.named_modules())
    return {
        name: (
            torch.randn(rank, modules[name].in_features, generator=g) * 0.1,
            torch.randn(modules[name].out_features, rank, generator=g) * 0.1,
        )
        for name in TARGETS
    }


def _lora_forward(model, pairs, scale):
    """The unmerged LoRA forward: y = W x + b + scale · B A x, as hooks on the Linears."""
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, args, out, a=a, b=b: out + scale * F.linear(F.linear(args[0], a), b)
        )
        for name, (a, b) in pairs.items()
    ]
    try:
        return _out(model)
    finally:
        for handle in handles:
            handle.remove()


def test_longlive_base_plus_lora_equals_lora_forward(tmp_path, models):
    base, _ = models
    torch.save(
        {"generator": {f"model.{k}": v for k, v in base.state_dict().items()}}, tmp_path / "base.pt"
    )
    pairs = _lora_pairs(base)
    peft = {}
    for name, (a, b) in pairs.items():
        peft[f"base_model.model.{name}.lora_A.weight"] = a
        peft[f"base_model.model.{name}.lora_B.weight"] = b
    torch.save({"generator_lora": peft, "critic_lora": {}}, tmp_path / "lora.pt")
    expected = _lora_forward(base, pairs, scale=8 / 4)
    model = load_causal_wan(tmp_path / "base.pt", CONFIG, lora=tmp_path / "lora.pt", lora_alpha=8)
    torch.testing.assert_close(_out(model), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(model), _out(base), atol=1e-3)  # the LoRA matters


def test_peft_folder_alpha_from_adapter_config(tmp_path, models):
    base, _ = models
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    pairs = _lora_pairs(base, rank=2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            f"base_model.model.{n}.lora_{s}.weight": t
            for n, ab in pairs.items()
            for s, t in zip("AB", ab, strict=True)
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 6}))
    model = load_causal_wan(tmp_path / "base.safetensors", CONFIG, lora=adapter)
    torch.testing.assert_close(_out(model), _lora_forward(base, pairs, 3.0), rtol=1e-5, atol=1e-5)


def test_lora_for_a_missing_weight_is_named(tmp_path, models):
    base, _ = models
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    save_file(
        {"blocks.7.self_attn.q.lora_A.weight": a, "blocks.7.self_attn.q.lora_B.weight": b},
        tmp_path / "l.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"blocks\.7\.self_attn\.q\.weight"):
        load_causal_wan(tmp_path / "base.safetensors", CONFIG, lora=tmp_path / "l.safetensors")


# -- broken checkpoints -----------------------------------------------------------------------


def _edited(tmp_path, model, edit):
    state = {k: v.clone() for k, v in model.state_dict().items()}  # never the model's own
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("blocks.1.ffn.2.bias"), r"1 missing \(blocks\.1\.ffn\.2\.bias\)"),
        (lambda s: s.update({"blocks.0.self_attn.k_img.weight": torch.zeros(2, 2)}),
         r"1 unexpected \(blocks\.0\.self_attn\.k_img\.weight\).*image-to-video"),
        (lambda s: s.update({"blocks.0.modulation": torch.zeros(1, 5, 64)}),
         r"1 mis-shaped \(blocks\.0\.modulation: \(1, 5, 64\) vs model \(1, 6, 64\)\)"),
        (lambda s: s["blocks.1.cross_attn.o.weight"].__setitem__((0, 0), float("nan")),
         r"non-finite.*blocks\.1\.cross_attn\.o\.weight"),
        (lambda s: s.update({"text_embedding.0.weight": torch.zeros(64, 48)}),
         r"conflict on text_dim: 48 from the weights, 32 from config"),
    ],
    ids=["missing", "unexpected", "mis-shaped", "nan", "conflict"],
)  # fmt: skip
def test_mismatched_checkpoint_is_an_error_naming_the_key(tmp_path, models, edit, message):
    path = _edited(tmp_path, models[0], edit)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=message):
        load_causal_wan(path, CONFIG)
    assert path.read_bytes() == before


def test_many_missing_keys_are_counted(tmp_path, models):
    path = _edited(
        tmp_path,
        models[0],
        lambda s: [s.pop(k) for k in list(s) if k.startswith("blocks.1.cross_attn.")],
    )
    with pytest.raises(
        CheckpointError, match=r"10 missing \(blocks\.1\.cross_attn\.k\.bias, .*, \.\.\.\)"
    ):
        load_causal_wan(path, CONFIG)


def test_corrupted_files_are_errors_naming_the_file(tmp_path, models, wan_transformer):
    path = tmp_path / "w.safetensors"
    save_file(models[0].state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors"):
        load_causal_wan(path, CONFIG)
    torch.save({"generator": {"model.x": "not a tensor"}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: 1 entr.*\['model\.x'\]"):
        load_causal_wan(tmp_path / "bad.pt", CONFIG)
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"trunc\.pt: cannot be read"):
        load_causal_wan(tmp_path / "trunc.pt", CONFIG)
    folder = tmp_path / "sharded"
    wan_transformer.save_pretrained(folder, max_shard_size="30KB")
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, missing"):
        load_causal_wan(folder, FIELDS)


def test_bad_arguments_are_named(tmp_path, models):
    torch.save({"generator_ema": {}}, tmp_path / "ema_only.pt")
    with pytest.raises(CheckpointError, match="ema=False needs a 'generator'"):
        load_causal_wan(tmp_path / "ema_only.pt", CONFIG, ema=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_causal_wan(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        save_file(models[0].state_dict(), tmp_path / "w.safetensors")
        load_causal_wan(tmp_path / "w.safetensors", {"heads": 4})
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        load_causal_wan(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        load_causal_wan(
            tmp_path / "w.safetensors", CONFIG, lora=tmp_path / "w.safetensors", lora_alpha=-1
        )


def test_diffusers_named_lora(tmp_path, models):
    base, _ = models
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    pairs = _lora_pairs(base)
    diffusers_names = {
        "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
        "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
        "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj",
    }
    lora = {}
    for name, (a, b) in pairs.items():
        lora[f"transformer.{diffusers_names[name]}.lora_A.weight"] = a
        lora[f"transformer.{diffusers_names[name]}.lora_B.weight"] = b
    save_file(lora, tmp_path / "lora.safetensors")
    model = load_causal_wan(
        tmp_path / "base.safetensors", CONFIG, lora=tmp_path / "lora.safetensors"
    )
    torch.testing.assert_close(_out(model), _lora_forward(base, pairs, 1.0), rtol=1e-5, atol=1e-5)
