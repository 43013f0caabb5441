"""`sparsify plan`: print the graph pass's plan for a reference-model preset or a diffusers Wan.

The model is built on the meta device and captured from meta inputs, so no weight is
allocated or computed (the 1.3B presets take seconds and no memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = "print the sparsification plan (sites, decisions, reasons) of a model preset"

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runtime.model_config import ATTN_IMPLS, PRESETS

    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="reference CausalWanModel preset"
    )
    source.add_argument(
        "--diffusers-wan",
        choices=sorted(DIFFUSERS_WAN),
        help="a diffusers WanTransformer3DModel config instead (bidirectional: full-sequence mode)",
    )
    parser.add_argument("--attn-impl", choices=ATTN_IMPLS, default="sdpa")
    parser.add_argument(
        "--num-kv-heads", type=int, default=None, help="GQA for the reference model"
    )
    parser.add_argument(
        "--persistent-blocks",
        type=int,
        default=None,
        help="plan PersistentLocal(persistent_blocks=C, ...) instead of Dense()",
    )
    parser.add_argument("--window-frames", type=int, default=6)
    parser.add_argument("--local-topk", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=None, help="default: sparsify.defaults")
    parser.add_argument("--q-block", type=int, default=None, help="default: the page size")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _pattern(args: argparse.Namespace):
    from patterns import Dense, PersistentLocal

    if args.persistent_blocks is None:
        return Dense()
    return PersistentLocal(
        persistent_blocks=args.persistent_blocks,
        window_frames=args.window_frames,
        local_topk=args.local_topk,
    )


def _reference(args: argparse.Namespace):
    import torch

    from runtime import CausalWanModel, WanConfig

    overrides = {"attn_impl": args.attn_impl}
    if args.num_kv_heads is not None:
        overrides["num_kv_heads"] = args.num_kv_heads
    cfg = WanConfig.preset(args.preset, **overrides)
    f = cfg.frames_per_chunk
    with torch.device("meta"):
        model = CausalWanModel(cfg)
        x = torch.empty(1, cfg.in_channels, f, cfg.latent_height, cfg.latent_width)
        inputs = (x, torch.empty(1, f), torch.empty(1, cfg.text_len, cfg.text_dim), 0)
    sizes = {"page_size": args.page_size, "q_block": args.q_block or args.page_size}
    return model, inputs, None, {k: v for k, v in sizes.items() if v is not None}


def _diffusers(args: argparse.Namespace):
    import torch
    from diffusers import WanTransformer3DModel

    from sparsify.defaults import default_geometry

    config, (frames, height, width), tokens = DIFFUSERS_WAN[args.diffusers_wan]
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
        inputs = {
            "hidden_states": torch.empty(1, config["in_channels"], frames, height, width),
            "timestep": torch.empty(1, dtype=torch.long),
            "encoder_hidden_states": torch.empty(
                1, TEXT_LEN[args.diffusers_wan], config["text_dim"]
            ),
            "return_dict": False,
        }
    geometry = default_geometry(tokens, frames_per_chunk=1)
    page = args.page_size or geometry.page_size
    geometry = dataclasses.replace(geometry, page_size=page, q_block=args.q_block or page)
    return model, inputs, geometry, {"mode": "full_sequence"}


def run(args: argparse.Namespace) -> int:
    from sparsify.api import sparsify

    build = _diffusers if args.diffusers_wan else _reference
    model, inputs, geometry, options = build(args)
    module = sparsify(model, inputs, _pattern(args), geometry, args.backend, **options)
    if args.json:
        print(json.dumps(module.plan.to_dict(), indent=2))
    else:
        print(module.plan)
    return 0
