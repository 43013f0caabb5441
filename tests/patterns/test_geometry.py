import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from patterns.geometry import VideoGeometry, token_block_frames

pow2 = st.sampled_from([1, 2, 4, 8, 16, 32, 128])


def test_wan_480p_tiles_1560_tokens_into_12_full_pages_and_one_of_24():
    g = VideoGeometry.wan_480p()
    assert (g.tokens_per_frame, g.frames_per_chunk, g.page_size, g.q_block) == (1560, 3, 128, 128)
    assert g.pages_per_frame == 13
    lens = g.frame_page_lens()
    assert lens.dtype == torch.int32
    assert lens.tolist() == [128] * 12 + [24]
    assert g.chunk_tokens == 4680 and g.q_blocks_per_chunk == 37 and g.pages_per_chunk == 39


def test_for_latent_patches_the_latent_grid():
    assert VideoGeometry.for_latent(16, 16).tokens_per_frame == 64
    assert VideoGeometry.for_latent(10, 14, patch=(2, 2), page_size=16).tokens_per_frame == 35
    with pytest.raises(ValueError, match="patch"):
        VideoGeometry.for_latent(15, 16)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(tokens_per_frame=0), "tokens_per_frame"),
        (dict(tokens_per_frame=64, frames_per_chunk=0), "frames_per_chunk"),
        (dict(tokens_per_frame=64, page_size=48), "page_size"),
        (dict(tokens_per_frame=64, q_block=100), "q_block"),
        (dict(tokens_per_frame=64.0), "tokens_per_frame"),
        (dict(tokens_per_frame=True), "tokens_per_frame"),
    ],
)
def test_invalid_fields_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VideoGeometry(**kwargs)


@given(t=st.integers(1, 300), page=pow2)
def test_frame_pages_tile_the_frame(t, page):
    g = VideoGeometry(t, page_size=page)
    lens = g.frame_page_lens().tolist()
    assert len(lens) == g.pages_per_frame
    assert sum(lens) == t
    assert all(1 <= n <= page for n in lens)
    assert all(n == page for n in lens[:-1])


@given(t=st.integers(1, 90), frames=st.integers(1, 4), block=pow2)
def test_q_block_frames_match_a_token_by_token_count(t, frames, block):
    g = VideoGeometry(t, frames_per_chunk=frames, q_block=block)
    got = g.q_block_frames().tolist()
    rows = frames * t
    expected = []
    for start in range(0, rows, block):
        touched = {tok // t for tok in range(start, min(start + block, rows))}
        expected.append([min(touched), max(touched)])
    assert got == expected
    assert len(got) == g.q_blocks_per_chunk


def test_token_block_frames_for_straddling_pages():
    # 35-token frames, 16-token blocks: block 2 (tokens 32..47) touches frames 0 and 1
    frames = token_block_frames(70, 16, 35).tolist()
    assert frames == [[0, 0], [0, 0], [0, 1], [1, 1], [1, 1]]
    with pytest.raises(ValueError):
        token_block_frames(0, 16, 35)


@given(t=st.integers(1, 40), frames=st.integers(1, 3), page=st.sampled_from([4, 8, 16]))
def test_to_pages_round_trips_each_frame(t, frames, page):
    g = VideoGeometry(t, page_size=page)
    x = torch.randn(2, frames * t, 3, 5, dtype=torch.float64)
    pages = g.to_pages(x)
    ppf = g.pages_per_frame
    assert pages.shape == (2, 3, frames * ppf, page, 5)
    lens = g.frame_page_lens()
    for f in range(frames):
        tokens = torch.cat(
            [pages[:, :, f * ppf + p, : lens[p]] for p in range(ppf)], dim=2
        )  # [B, Hkv, T, D]
        torch.testing.assert_close(tokens, x[:, f * t : (f + 1) * t].transpose(1, 2))
        tail = pages[:, :, f * ppf + ppf - 1, lens[-1] :]
        assert (tail == 0).all()


def test_to_pages_rejects_partial_frames():
    g = VideoGeometry(10, page_size=4)
    with pytest.raises(ValueError, match="whole frames"):
        g.to_pages(torch.zeros(1, 15, 1, 4))
