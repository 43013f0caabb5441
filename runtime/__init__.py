"""Running the sparse AR rollout: the reference model, the eager KV caches, the rollout driver."""

from runtime.model import CausalWanModel
from runtime.model_config import WanConfig, wan_parameter_count

__all__ = [
    "CausalWanModel",
    "WanConfig",
    "wan_parameter_count",
]
