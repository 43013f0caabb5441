"""The world's scorer plumbing: the recall table reads the learned file it is given, and
training refuses to be measured on its own scenes."""

import pytest
import torch

from patterns import VideoGeometry, save_scorers
from runtime import CausalWanModel, WanConfig
from world.scorers import recall_table, scorer_host, train_world_scorer

CONFIG = WanConfig.preset(
    "world", dim=32, num_heads=2, num_kv_heads=2, num_layers=2, ffn_dim=64, freq_dim=32
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanModel(CONFIG).eval()


def _geometry():
    return VideoGeometry(CONFIG.tokens_per_frame, CONFIG.frames_per_chunk, 32, 32)


def test_recall_table_measures_the_file_it_is_given(model, tmp_path):
    gen = torch.Generator().manual_seed(1)
    d = CONFIG.head_dim
    samples = [
        [(torch.randn(1, 128, 2, d, generator=gen), torch.randn(1, 512, 2, d, generator=gen))]
        for _ in range(CONFIG.num_layers)
    ]
    trained = scorer_host(model, _geometry())
    with torch.no_grad():
        for state in trained.states:
            state.scorer.wq.copy_(torch.randn(state.scorer.wq.shape, generator=gen))
    path = tmp_path / "scorers.safetensors"
    save_scorers(trained, path)

    table = recall_table(model, [], _geometry(), path, samples=samples)
    assert set(table) == {"oracle", "identity", "learned"}
    assert table["learned"][0.25] != pytest.approx(table["identity"][0.25], abs=1e-4)
    for density in (0.25, 0.125):
        assert table["oracle"][density] >= max(
            table["identity"][density], table["learned"][density]
        )
    assert set(recall_table(model, [], _geometry(), None, samples=samples)) == {
        "oracle",
        "identity",
    }


def test_train_world_scorer_refuses_held_out_scenes_among_its_training_scenes(model, tmp_path):
    out = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="eval_seeds must be held out.*\\[5\\]"):
        train_world_scorer(model, [1, 2], [5], [5, 9], _geometry(), out)
    assert not out.exists()
