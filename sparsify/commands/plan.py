"""`sparsify plan`: print the graph pass's plan for a reference-model preset or a diffusers Wan.

The model is built from fake tensors (shapes and dtypes, no storage), so no weight is
allocated or computed (the 1.3B presets take seconds and no memory). Fake tensors rather
than the meta device: `flex_attention` refuses meta inputs, fake CPU tensors it accepts.
Without options the plan is of the default Sparse Forcing configuration (`sparsify.defaults`),
the one `sparsify demo` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json

from sparsify.commands.args import FlagError, flag_errors, fraction, nonneg_int, positive_int, tile

DIFFUSERS_WAN = {
    # name: (WanTransformer3DModel config, latent (frames, height, width), tokens per frame)
    "tiny": (
        dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
            rope_max_seq_len=32,
        ),
        (3, 8, 8),
        16,
    ),
    "wan2.1-1.3b": (
        dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
        ),
        (21, 60, 104),
        1560,
    ),
}  # fmt: skip
TEXT_LEN = {"tiny": 5, "wan2.1-1.3b": 512}
PATTERNS = ("persistent-local", "dense")
PATTERN_FLAGS = ("--persistent-blocks", "--window-frames", "--local-topk", "--local-density")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from codegen.api import BACKENDS
    from runtime.model_config import ATTN_IMPLS, PRESETS

    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="reference CausalWanModel preset"
    )
    source.add_argument(
        "--diffusers-wan",
        choices=sorted(DIFFUSERS_WAN),
        help="a diffusers WanTransformer3DModel config instead (bidirectional: full-sequence "
        "mode; needs the [diffusers] extra)",
    )
    parser.add_argument(
        "--attn-impl",
        choices=ATTN_IMPLS,
        default="sdpa",
        help="how the reference model spells its attention",
    )
    parser.add_argument(
        "--num-kv-heads",
        type=positive_int,
        help="GQA for the reference model (divides its heads; default: one per head)",
    )
    parser.add_argument("--pattern", choices=PATTERNS, default=PATTERNS[0], help="what to plan")
    parser.add_argument(
        "--persistent-blocks",
        type=nonneg_int,
        help="persistent pages per kv head (default: 4096 tokens at Wan size, two frames' "
        "pages for small models)",
    )
    parser.add_argument(
        "--window-frames",
        type=positive_int,
        help="frames in the local window, the current chunk's included (default: three "
        "chunks); with --pattern dense, the rolling window (default: every frame)",
    )
    local = parser.add_mutually_exclusive_group()
    local.add_argument(
        "--local-topk", type=positive_int, help="window pages per query block (default: by density)"
    )
    local.add_argument(
        "--local-density",
        type=fraction,
        help="fraction of the window's pages per query block (default: 0.125)",
    )
    parser.add_argument(
        "--page-size",
        type=tile,
        help="tokens per KV page (default: 128 at 512+ tokens per frame, else 16)",
    )
    parser.add_argument("--q-block", type=tile, help="queries per block (default: the page size)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="kernel backend")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _pattern(args: argparse.Namespace, geometry, cached: bool):
    """The pattern of the flags on top of `sparsify.defaults`' default, checked against the
    geometry in cached mode."""
    from patterns import Dense
    from sparsify.defaults import default_pattern

    with flag_errors(*PATTERN_FLAGS):
        if args.pattern == "dense":
            for flag in PATTERN_FLAGS:
                if flag != "--window-frames" and getattr(args, _dest(flag)) is not None:
                    raise FlagError(flag, "an option of --pattern persistent-local, not dense")
            pattern = Dense(window_frames=args.window_frames)
        else:
            overrides = {
                _dest(f): getattr(args, _dest(f))
                for f in PATTERN_FLAGS
                if getattr(args, _dest(f)) is not None
            }
            if "local_topk" in overrides:
                overrides["local_density"] = None
            pattern = dataclasses.replace(default_pattern(geometry), **overrides)
        if cached:
            pattern.check_geometry(geometry)
    return pattern


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _geometry(args: argparse.Namespace, tokens_per_frame: int, frames_per_chunk: int):
    from sparsify.defaults import default_geometry

    geometry = default_geometry(tokens_per_frame, frames_per_chunk)
    page = args.page_size or geometry.page_size
    with flag_errors("--page-size", "--q-block"):
        return dataclasses.replace(geometry, page_size=page, q_block=args.q_block or page)


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _reference(args: argparse.Namespace):
    import torch

    from runtime import CausalWanModel, WanConfig

    overrides = {"attn_impl": args.attn_impl}
    if args.num_kv_heads is not None:
        overrides["num_kv_heads"] = args.num_kv_heads
    with flag_errors("--num-kv-heads", "--attn-impl"):
        cfg = WanConfig.preset(args.preset, **overrides)
    geometry = _geometry(args, cfg.tokens_per_frame, cfg.frames_per_chunk)
    pattern = _pattern(args, geometry, cached=True)
    f = cfg.frames_per_chunk
    with _fake():
        model = CausalWanModel(cfg)
        x = torch.empty(1, cfg.in_channels, f, cfg.latent_height, cfg.latent_width)
        inputs = (x, torch.empty(1, f), torch.empty(1, cfg.text_len, cfg.text_dim), 0)
    return model, inputs, pattern, geometry, {}


def _diffusers(args: argparse.Namespace):
    if importlib.util.find_spec("diffusers") is None:
        raise FlagError(
            "--diffusers-wan", "needs diffusers: pip install 'sparse-forcing[diffusers]'"
        )
    if args.num_kv_heads is not None or args.attn_impl != "sdpa":
        flag = "--num-kv-heads" if args.num_kv_heads is not None else "--attn-impl"
        raise FlagError(flag, "an option of --preset's reference model, not of --diffusers-wan")
    import torch
    from diffusers import WanTransformer3DModel

    config, (frames, height, width), tokens = DIFFUSERS_WAN[args.diffusers_wan]
    geometry = _geometry(args, tokens, frames_per_chunk=1)
    pattern = _pattern(args, geometry, cached=False)
    with _fake():
        model = WanTransformer3DModel(**config)
        inputs = {
            "hidden_states": torch.empty(1, config["in_channels"], frames, height, width),
            "timestep": torch.empty(1, dtype=torch.long),
            "encoder_hidden_states": torch.empty(
                1, TEXT_LEN[args.diffusers_wan], config["text_dim"]
            ),
            "return_dict": False,
        }
    return model, inputs, pattern, geometry, {"mode": "full_sequence"}


def run(args: argparse.Namespace) -> int:
    from sparsify.api import sparsify

    build = _diffusers if args.diffusers_wan else _reference
    model, inputs, pattern, geometry, options = build(args)
    module = sparsify(model, inputs, pattern, geometry, args.backend, **options)
    if args.json:
        print(json.dumps(module.plan.to_dict(), indent=2))
    else:
        print(module.plan)
    return 0
