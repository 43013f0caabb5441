"""Running the sparse AR rollout: the reference model, the eager KV caches, the rollout driver,
head-parallel execution on torch.distributed."""

from runtime.attention_runtime import AttentionRuntime, StatefulRunner
from runtime.attention_state import AttentionState
from runtime.bidirectional import FullSequenceAttention
from runtime.checkpoints import CheckpointError, load_causal_wan
from runtime.clip_attention import ClipAttention
from runtime.eager import EagerRunner, GlobalCache, RollingCache, self_forcing_cache
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig, wan_parameter_count
from runtime.parallel import (
    HeadParallelRunner,
    HeadParallelRuntime,
    head_parallel_reference_runner,
)
from runtime.parallel_eager import HeadParallelEagerRunner
from runtime.pool import PagePool
from runtime.reference_runner import bind_reference_model, reference_runner
from runtime.rollout import ChunkRunner, SelfForcingSchedule, generate

__all__ = [
    "AttentionRuntime",
    "AttentionState",
    "CheckpointError",
    "ClipAttention",
    "FullSequenceAttention",
    "PagePool",
    "StatefulRunner",
    "bind_reference_model",
    "reference_runner",
    "CausalWanModel",
    "ChunkRunner",
    "EagerRunner",
    "GlobalCache",
    "HeadParallelEagerRunner",
    "HeadParallelRunner",
    "HeadParallelRuntime",
    "RollingCache",
    "SelfForcingSchedule",
    "WanConfig",
    "generate",
    "head_parallel_reference_runner",
    "load_causal_wan",
    "self_forcing_cache",
    "wan_parameter_count",
]
