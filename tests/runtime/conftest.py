import pytest
import torch

from runtime import CausalWanModel, WanConfig


@pytest.fixture(scope="module")
def tiny():
    """The misaligned tiny model (35 tokens per frame, never aligned with 16-token pages) with
    GQA 4 -> 2 heads, and a text context (modules may define their own `tiny`)."""
    config = WanConfig.preset("tiny_misaligned", num_kv_heads=2)
    model = CausalWanModel(config).eval()
    context = torch.randn(1, config.text_len, config.text_dim, generator=torch.Generator())
    return model, context
