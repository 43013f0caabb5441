import pytest
import torch

from codegen.reference import pbsa_reference
from patterns import Dense, PersistentLocal, VideoGeometry, full_sequence_table
from runtime import FullSequenceAttention

GEOMETRY = VideoGeometry(12, page_size=8, q_block=16)  # 8-token blocks straddle 12-token frames


def _inputs(frames=5, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = frames * GEOMETRY.tokens_per_frame
    return (
        torch.randn(1, n, heads, dim, generator=g),
        torch.randn(1, n, kv_heads, dim, generator=g),
        torch.randn(1, n, kv_heads, dim, generator=g),
    )


def test_dense_equals_full_attention():
    q, k, v = _inputs()
    attn = FullSequenceAttention(Dense(), GEOMETRY, 4, 2, 16, backend="torch")
    out = attn(q, k, v)
    kk, vv = (x.repeat_interleave(2, dim=2).transpose(1, 2) for x in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk, vv)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_persistent_local_runs_its_table_in_contiguous_mode():
    q, k, v = _inputs(seed=1)
    pattern = PersistentLocal(2, 4, local_topk=2, radius_frames=1)
    attn = FullSequenceAttention(pattern, GEOMETRY, 4, 2, 16, backend="torch")
    with torch.no_grad():
        attn.scorer.wq.mul_(-1)  # a learned scorer: the table must come from this one
    out = attn(q, k, v)
    table = full_sequence_table(pattern, q, k, GEOMETRY, attn.scorer)
    untrained = full_sequence_table(pattern, q, k, GEOMETRY)
    assert not torch.equal(table.kv_indices, untrained.kv_indices)
    expected, _ = pbsa_reference(
        q, k, v, table.kv_num_blocks, table.kv_indices, q_block=16, page_size=8
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    dense = FullSequenceAttention(Dense(), GEOMETRY, 4, 2, 16, backend="torch")(q, k, v)
    assert (out - dense).abs().max() > 1e-3


def test_bad_inputs_are_rejected_by_name():
    q, k, v = _inputs()
    attn = FullSequenceAttention(Dense(), GEOMETRY, 4, 2, 16)
    with pytest.raises(ValueError, match="k must be"):
        attn(q, k[..., :8], v)
    with pytest.raises(ValueError, match="share B and L"):
        attn(q, k[:, :24], v[:, :24])
    with pytest.raises(ValueError, match="whole number"):
        attn(q[:, :30], k[:, :30], v[:, :30])
    with pytest.raises(ValueError, match="backend"):
        FullSequenceAttention(Dense(), GEOMETRY, 4, 2, 16, backend="gpu")


def test_scorer_is_a_parameter_of_the_module():
    attn = FullSequenceAttention(PersistentLocal(2, 4), GEOMETRY, 4, 2, 16)
    assert {"scorer.wq", "scorer.wk"} <= set(attn.state_dict())
