import math

import pytest
import torch
from torch import nn

from patterns.diagnostics import attention_mass_recall
from patterns.scoring import BlockScorer, block_attention_mass, pool_key_blocks, pool_query_blocks
from patterns.selection import topk_mask
from patterns.training import capture_qk, train_scorers

HEADS, KV_HEADS, DIM, BLOCK, KEY_BLOCKS = 4, 2, 16, 16, 16
TOPK = 4  # 25 % of the key blocks, the paper's operating point


def planted_qk(gen: torch.Generator, basis: torch.Tensor, batch: int = 2, lq: int = 60):
    """q/k where mean pooling ranks the wrong blocks first.

    Two fixed orthonormal directions of the head space (a property of the "model", shared by
    all samples): s carries salience, d is a nuisance. Every query has the same component
    (2·s + 2·d) plus noise. Per sample and kv head, at random positions:

    * 3 salient key blocks hold 2 "spike" tokens with +12·s: logit ≈ 6 each, so these blocks
      take most of the dense attention, but their mean along s is only 12·2/16 = 1.5;
    * 5 nuisance blocks are shifted by a block-constant +4·d: every token gets logit ≈ 2,
      modest mass, yet the block mean along d is 4;
    * the other 8 blocks are noise.

    Mean pooling scores nuisance blocks 2·4 = 8 and salient ones 2·1.5 = 3, so its top-4 is
    mostly nuisance. A linear projection that weights s up and d down ranks them correctly,
    and it must generalise: positions differ in every sample.
    """
    s, d = basis[:, 0], basis[:, 1]
    q = 0.5 * torch.randn(batch, lq, HEADS, DIM, generator=gen) + 2.0 * (s + d)
    k = torch.randn(batch, KEY_BLOCKS, BLOCK, KV_HEADS, DIM, generator=gen)
    role = torch.rand(batch, KEY_BLOCKS, KV_HEADS, generator=gen).argsort(1).argsort(1)
    salient, nuisance = role < 3, (role >= 3) & (role < 8)
    spike = torch.rand(batch, KEY_BLOCKS, BLOCK, KV_HEADS, generator=gen).argsort(2).argsort(2) < 2
    k = k + 4.0 * nuisance[:, :, None, :, None] * d
    k = k + 12.0 * (salient[:, :, None, :] & spike)[..., None] * s
    return q, k.reshape(batch, KEY_BLOCKS * BLOCK, KV_HEADS, DIM)


def _selection_recall(scorer: BlockScorer | None, samples) -> float:
    """Independent path: top-K by block_logits → visibility → token-level recall.

    ``scorer=None`` selects by the true block mass: the best any top-K selection can do.
    """
    values = []
    for q, k in samples:
        if scorer is None:
            scores = block_attention_mass(q, k, BLOCK, BLOCK)
        else:
            scores = scorer.block_logits(pool_query_blocks(q, BLOCK), pool_key_blocks(k, BLOCK))
        visible = topk_mask(scores.detach(), TOPK)
        values.append(attention_mass_recall(q, k, visible, BLOCK, BLOCK).mean())
    return float(torch.stack(values).mean())


@pytest.fixture
def one_thread():
    """Training here is thousands of tiny ops: on a shared CPU an intra-op thread pool only
    adds barrier waits (observed 0.5 s with one thread vs 15 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trained_scorer_beats_mean_pooling_on_planted_salience(one_thread):
    gen = torch.Generator().manual_seed(1234)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    train = [planted_qk(gen, basis) for _ in range(8)]
    held_out = [planted_qk(gen, basis) for _ in range(8)]
    torch.manual_seed(0)
    scorer = BlockScorer(HEADS, KV_HEADS, DIM)
    mean_pool = _selection_recall(scorer, held_out)
    result = train_scorers(
        [scorer],
        [train],
        q_block=BLOCK,
        kv_block=BLOCK,
        steps=100,
        lr=0.05,
        topk=TOPK,
        eval_samples=[held_out],
        progress=False,
    )
    trained = _selection_recall(scorer, held_out)
    oracle = _selection_recall(None, held_out)
    print(
        f"\nheld-out attention-mass recall at top-{TOPK}/{KEY_BLOCKS} blocks: "
        f"mean pooling {mean_pool:.3f} -> trained scorer {trained:.3f} "
        f"(oracle top-{TOPK} by true mass {oracle:.3f}; "
        f"KL {result['loss'][0]:.3f} -> {result['loss'][-1]:.3f})"
    )
    assert result["recall_before"][0] == pytest.approx(mean_pool, abs=1e-4)
    assert result["recall_after"][0] == pytest.approx(trained, abs=1e-4)
    assert result["mean_recall_after"] == pytest.approx(trained, abs=1e-4)
    assert len(result["loss"]) == 100 and all(v >= -1e-6 for v in result["loss"])
    assert result["loss"][-1] < 0.25 * result["loss"][0]
    assert mean_pool < 0.4
    assert trained > mean_pool + 0.3
    assert trained <= oracle + 1e-6


def test_train_scorers_accepts_dict_samples_and_trains_layers_independently():
    gen = torch.Generator().manual_seed(0)
    scorers = [BlockScorer(2, 1, 8), BlockScorer(2, 2, 8)]
    samples = [
        [
            {
                "q": torch.randn(1, 12, 2, 8, generator=gen),
                "k": torch.randn(1, 20, 1, 8, generator=gen),
            }
        ],
        [(torch.randn(1, 12, 2, 8, generator=gen), torch.randn(1, 20, 2, 8, generator=gen))],
    ]
    result = train_scorers(
        scorers, samples, q_block=4, kv_block=4, steps=3, lr=0.01, progress=False
    )
    assert len(result["loss"]) == 3
    assert len(result["recall_before"]) == len(result["recall_after"]) == 2
    eye = torch.eye(8)
    assert all(not torch.allclose(s.wq, eye.expand_as(s.wq)) for s in scorers)


def test_train_scorers_rejects_bad_input_without_touching_scorers():
    scorer = BlockScorer(2, 1, 8)
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    good = [(torch.randn(1, 8, 2, 8), torch.randn(1, 8, 1, 8))]
    bad_heads = [(torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8))]
    kwargs = dict(q_block=4, kv_block=4, steps=2, lr=0.01, progress=False)
    with pytest.raises(ValueError, match="one sequence of samples per scorer"):
        train_scorers([scorer], [good, good], **kwargs)
    with pytest.raises(ValueError, match=r"samples\[0\]\[1\].*heads"):
        train_scorers([scorer], [good + bad_heads], **kwargs)
    with pytest.raises(ValueError, match="topk"):
        train_scorers([scorer], [good], topk=1.5, **kwargs)
    with pytest.raises(ValueError, match="lr"):
        train_scorers([scorer], [good], q_block=4, kv_block=4, steps=2, lr=0.0)
    with pytest.raises(TypeError, match="scorers"):
        train_scorers([nn.Linear(2, 2)], [good], **kwargs)
    for key, value in scorer.state_dict().items():
        assert torch.equal(value, before[key])


class _Attention(nn.Module):
    def forward(self, q, k, v):  # BLHD, GQA by repeat
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.kv = nn.Linear(8, 16)
        self.o = nn.Linear(16, 8)
        self.attn = nn.ModuleList([_Attention(), _Attention()])

    def forward(self, x):
        for attn in self.attn:
            q = self.q(x).unflatten(-1, (4, 4))
            k, v = self.kv(x).unflatten(-1, (2, 2, 4)).unbind(2)
            x = x + self.o(attn(q, k=k, v=v).flatten(2))
        return x


def test_capture_qk_records_every_call_and_removes_hooks():
    model = _TwoLayers()
    x = torch.randn(2, 10, 8)
    with capture_qk(list(model.attn)) as samples:
        model(x)
        model(x[:, :6])
    assert [len(layer) for layer in samples] == [2, 2]
    q0, k0 = samples[0][0]
    assert q0.shape == (2, 10, 4, 4) and k0.shape == (2, 10, 2, 4) and not q0.requires_grad
    torch.testing.assert_close(q0, model.q(x).unflatten(-1, (4, 4)).detach())
    assert samples[1][1][0].shape == (2, 6, 4, 4)
    model(x)
    assert [len(layer) for layer in samples] == [2, 2]  # hooks are gone
    assert all(not m._forward_pre_hooks for m in model.attn)
    scorers = [BlockScorer(4, 2, 4) for _ in model.attn]
    result = train_scorers(
        scorers, samples, q_block=4, kv_block=4, steps=2, lr=0.01, progress=False
    )
    assert len(result["loss"]) == 2


def test_capture_qk_removes_hooks_after_an_error():
    attn = _Attention()
    with pytest.raises(TypeError, match="capture_qk"), capture_qk([attn]):
        attn(torch.randn(1, 4, 2, 4))  # q only: the hook cannot find k
    assert not attn._forward_pre_hooks


def test_scorer_recall_matches_the_training_report_and_grows_with_the_budget():
    from patterns import scorer_recall

    torch.manual_seed(3)
    q = torch.randn(1, 64, 2, 16)
    k = torch.randn(1, 128, 2, 16)
    scorers = [BlockScorer(2, 2, 16)]
    recall = scorer_recall(scorers, [[(q, k)]], q_block=16, kv_block=16, topk=(0.25, 1.0))
    one = scorer_recall(scorers, [[(q, k)]], q_block=16, kv_block=16, topk=(1,))[1]
    report = train_scorers(
        scorers, [[(q, k)]], q_block=16, kv_block=16, steps=0, lr=1.0, topk=0.25, progress=False
    )
    assert recall[0.25] == pytest.approx(report["mean_recall_before"])
    assert recall[1.0] == pytest.approx(1.0, abs=1e-5)
    assert one < recall[0.25] < 1.0
    with pytest.raises(ValueError, match="topk"):
        scorer_recall(scorers, [[(q, k)]], q_block=16, kv_block=16, topk=(0,))


def test_recall_table_matches_a_hand_computed_case():
    """One query block of two rows (q = 1, D = 1, so logits are the keys) over two key
    blocks: (3, -3) holds most of the mass but has mean 0, (1, 1) has mean 1. Mean pooling
    picks the second block, the oracle the first."""
    from patterns import recall_table

    q = torch.ones(1, 2, 1, 1)
    k = torch.tensor([3.0, -3.0, 1.0, 1.0]).reshape(1, 4, 1, 1)
    z = math.exp(3) + math.exp(-3) + 2 * math.e
    table = recall_table(
        {"identity": [BlockScorer(1, 1, 1)]}, [[(q, k)]], q_block=2, kv_block=2, topk=(1, 2)
    )
    assert table["identity"][1] == pytest.approx(2 * math.e / z, rel=1e-5)
    assert table["oracle"][1] == pytest.approx((math.exp(3) + math.exp(-3)) / z, rel=1e-5)
    assert table["oracle"][2] == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="reserved"):
        recall_table({"oracle": [BlockScorer(1, 1, 1)]}, [[(q, k)]], q_block=2, kv_block=2)


def test_recall_table_weights_a_partial_query_block_by_its_rows():
    """Three query rows in blocks of two: the partial block (one row) counts half as much."""
    from patterns import recall_table

    k = torch.tensor([3.0, -3.0, 1.0, 1.0]).reshape(1, 4, 1, 1)
    q = torch.tensor([1.0, 1.0, -1.0]).reshape(1, 3, 1, 1)
    table = recall_table(
        {"id": [BlockScorer(1, 1, 1)]}, [[(q, k)]], q_block=2, kv_block=2, topk=(1,)
    )
    z_pos = math.exp(3) + math.exp(-3) + 2 * math.e
    z_neg = math.exp(-3) + math.exp(3) + 2 / math.e
    # block 0 (q = +1): mean pooling picks the (1, 1) block; block 1 (q = -1): its mean key
    # score is -1 there and 0 on the (3, -3) block, so it picks the latter
    first, second = 2 * math.e / z_pos, (math.exp(-3) + math.exp(3)) / z_neg
    assert table["id"][1] == pytest.approx((2 * first + second) / 3, rel=1e-5)


def test_early_stopping_keeps_the_best_validation_state(one_thread):
    """Validation scenes whose salient and nuisance directions are swapped: what training
    learns makes them worse, so the best state is the untrained one and training stops after
    `patience` evaluations without improvement."""
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    swapped = basis[:, [1, 0, *range(2, DIM)]]
    train = [planted_qk(gen, basis) for _ in range(4)]
    val = [planted_qk(gen, swapped) for _ in range(4)]
    scorer = BlockScorer(HEADS, KV_HEADS, DIM)
    kwargs = dict(q_block=BLOCK, kv_block=BLOCK, lr=0.03, progress=False)
    report = train_scorers(
        [scorer], [train], steps=200, val_samples=[val], eval_every=5, patience=3, **kwargs
    )
    assert report["best_step"] == 0
    assert len(report["loss"]) == 15  # 3 evaluations after the best, 5 steps apart
    assert [s for s, _ in report["val_loss"]] == [0, 5, 10, 15]
    assert torch.equal(scorer.wq, torch.eye(DIM).expand_as(scorer.wq))
    assert report["mean_recall_oracle"] >= report["mean_recall_after"]

    helpful = BlockScorer(HEADS, KV_HEADS, DIM)
    held_in = [planted_qk(gen, basis) for _ in range(4)]
    report = train_scorers(
        [helpful], [train], steps=60, val_samples=[held_in], eval_every=20, **kwargs
    )
    assert report["best_step"] > 0
    assert report["val_loss"][-1][1] < report["val_loss"][0][1]
