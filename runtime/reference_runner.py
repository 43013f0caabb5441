"""The reference model on the paged runtime: its self-attention swapped for the states.

`reference_runner(model, pattern)` is the `ChunkRunner` of a copy of a `CausalWanModel`
whose layer i self-attention is `AttentionRuntime.states[i]` (`bind_reference_model`); the
model itself is left untouched. The runner's frame limit is the model's
(`WanConfig.max_frames`), so a rollout too long for its RoPE table is rejected up front.
"""

from __future__ import annotations

import copy

from patterns import Pattern, VideoGeometry
from runtime.attention_runtime import AttentionRuntime, StatefulRunner
from runtime.model import CausalWanModel

__all__ = ["bind_reference_model", "reference_runner"]


def bind_reference_model(model: CausalWanModel, runtime: AttentionRuntime) -> CausalWanModel:
    """Deep copy of ``model`` whose layer i self-attention is ``runtime.states[i]``."""
    if not isinstance(model, CausalWanModel):
        raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
    if len(model.blocks) != len(runtime.states):
        raise ValueError(
            f"model has {len(model.blocks)} layers, the runtime {len(runtime.states)} states"
        )
    bound = copy.deepcopy(model)
    for block, state in zip(bound.blocks, runtime.states, strict=True):
        block.self_attn.attn = state
    return bound


def reference_runner(
    model: CausalWanModel,
    pattern: Pattern,
    *,
    page_size: int = 128,
    q_block: int = 128,
    backend: str = "auto",
    debug: bool = False,
    cuda_graphs: bool = True,
) -> StatefulRunner:
    """A `StatefulRunner` of a copy of ``model`` with its self-attention on an
    `AttentionRuntime` of ``pattern`` (pages of ``page_size`` tokens, query blocks of
    ``q_block`` rows; ``backend``/``debug`` as for the runtime; ``cuda_graphs`` as for the
    runner)."""
    return bind_runner(
        model,
        pattern,
        AttentionRuntime,
        StatefulRunner,
        page_size=page_size,
        q_block=q_block,
        backend=backend,
        debug=debug,
        cuda_graphs=cuda_graphs,
    )


def bind_runner(
    model: CausalWanModel,
    pattern: Pattern,
    runtime_type: type[AttentionRuntime],
    runner_type: type[StatefulRunner],
    *,
    page_size: int,
    q_block: int,
    backend: str,
    debug: bool,
    cuda_graphs: bool,
    **runtime_options,
) -> StatefulRunner:
    """A ``runner_type`` of a copy of ``model`` bound to a ``runtime_type`` of ``pattern``
    laid out as the model (its geometry, layers, heads and frame limit); ``runtime_options``
    go to the runtime (`runtime.parallel` passes its process group)."""
    if not isinstance(model, CausalWanModel):
        raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
    cfg = model.config
    geometry = VideoGeometry(cfg.tokens_per_frame, cfg.frames_per_chunk, page_size, q_block)
    runtime = runtime_type(
        pattern,
        geometry,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        backend,
        debug,
        max_frames=cfg.max_frames,
        **runtime_options,
    )
    return runner_type(bind_reference_model(model, runtime), runtime, cuda_graphs)
