"""Loading real causal Wan checkpoints (Self-Forcing, CausVid, LongLive + LoRA, Wan2.1 in its
original and diffusers namings) into the reference `CausalWanModel`, strictly."""

from runtime.checkpoints.files import CheckpointError
from runtime.checkpoints.loader import load_causal_wan

__all__ = ["CheckpointError", "load_causal_wan"]
