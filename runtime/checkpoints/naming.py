"""Parameter names: from what training code and diffusers save to the reference model's.

The reference `CausalWanModel` uses Wan2.1's original names (Wan-Video/Wan2.1
`wan/modules/model.py`, kept by Self-Forcing's and CausVid's `CausalWanModel`):
`patch_embedding`, `text_embedding.{0,2}`, `time_embedding.{0,2}`, `time_projection.1`,
`blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}`, `blocks.N.norm3` (the affine
LayerNorm before cross-attention), `blocks.N.ffn.{0,2}`, `blocks.N.modulation`,
`head.head`, `head.modulation`.

Around them, training code adds prefixes: Self-Forcing / CausVid / LongLive save
`{"generator": ..., "generator_ema": ..., "critic": ...}` of a wrapper whose Wan model is
`model.`, FSDP inserts `_fsdp_wrapped_module.` (activation checkpointing
`_checkpoint_wrapped_module.`, torch.compile `_orig_mod.`) anywhere in a name, ComfyUI-style
files prefix `model.diffusion_model.`, PEFT `base_model.model.`.

diffusers' `WanTransformer3DModel` renames everything; `DIFFUSERS_TO_WAN` inverts the
mapping of diffusers' own converter (`convert_wan_transformer_to_diffusers` in
`diffusers/loaders/single_file_utils.py`, the same table as
`scripts/convert_wan_to_diffusers.py`). Its norm2/norm3 swap: diffusers' `norm2` is Wan's
affine cross-attention `norm3`, diffusers' parameter-free `norm3` is Wan's `norm2`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor

from runtime.checkpoints.files import CheckpointError, flat_tensors

WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "model.")
TRAINING_KEYS = ("generator_ema", "generator")

DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", ".attn1.", ".attn2.")


def select_generator(content: object, ema: bool, where: str) -> object:
    """The generator's state dict of a Self-Forcing / CausVid / LongLive training checkpoint
    (`generator_ema` first when `ema`), or `content` itself when it is not one."""
    if not isinstance(content, dict) or not any(k in content for k in TRAINING_KEYS):
        return content
    order = TRAINING_KEYS if ema else ("generator",)
    for key in order:
        if key in content:
            return content[key]
    raise CheckpointError(
        f"{where}: ema=False needs a 'generator' entry; the checkpoint holds "
        f"{sorted(map(str, content))} (pass ema=True to use 'generator_ema')"
    )


def _strip(name: str, prefixes: Iterable[str]) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def is_diffusers(names: Iterable[str]) -> bool:
    return any(marker in f".{n}" for n in names for marker in DIFFUSERS_MARKERS)


def diffusers_to_wan(name: str) -> str:
    """One diffusers parameter name in Wan's naming; a name outside the mapping (e.g. the
    image-to-video `add_k_proj`) is returned unchanged, so the strict check reports it."""
    module, _, leaf = name.rpartition(".")
    if module in DIFFUSERS_TOP:
        return f"{DIFFUSERS_TOP[module]}.{leaf}"
    if name == "scale_shift_table":
        return "head.modulation"
    match = _BLOCK.match(name)
    if match:
        index, rest = match.groups()
        if rest in DIFFUSERS_BLOCK:  # a bare parameter (the block's scale_shift_table)
            return f"blocks.{index}.{DIFFUSERS_BLOCK[rest]}"
        inner, _, leaf = rest.rpartition(".")
        if inner in DIFFUSERS_BLOCK:
            return f"blocks.{index}.{DIFFUSERS_BLOCK[inner]}.{leaf}"
    return name


def to_wan_names(tensors: dict[str, Tensor], where: str, prefixes=PREFIXES) -> dict[str, Tensor]:
    """Strip training wrappers and prefixes, convert diffusers names; two source names that
    land on the same name are an error naming both."""
    stripped: dict[str, str] = {}
    for name in tensors:
        stripped[name] = _strip(name, prefixes)
    convert = is_diffusers(stripped.values())
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in tensors.items():
        new = diffusers_to_wan(stripped[name]) if convert else stripped[name]
        if new in out:
            raise CheckpointError(f"{where}: {origin[new]!r} and {name!r} both map to {new!r}")
        out[new], origin[new] = tensor, name
    return out


def generator_tensors(content: object, ema: bool, where: str) -> dict[str, Tensor]:
    """The generator's tensors of any supported layout, in Wan's naming."""
    return to_wan_names(flat_tensors(select_generator(content, ema, where), where), where)
