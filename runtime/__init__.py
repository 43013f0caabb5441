"""Running the sparse AR rollout: the reference model, the eager KV caches, the rollout driver."""

from runtime.eager import EagerRunner, GlobalCache, RollingCache
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig, wan_parameter_count
from runtime.rollout import ChunkRunner, SelfForcingSchedule, generate

__all__ = [
    "CausalWanModel",
    "ChunkRunner",
    "EagerRunner",
    "GlobalCache",
    "RollingCache",
    "SelfForcingSchedule",
    "WanConfig",
    "generate",
    "wan_parameter_count",
]
