"""Teacher forcing sees what the cached rollout sees: masks, both attention paths, equality
with the prefix-conditioned eager rollout."""

import copy

import pytest
import torch

from patterns import Dense, PersistentLocal, VideoGeometry
from runtime import reference_runner
from runtime.eager import EagerRunner
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig
from runtime.rollout import SelfForcingSchedule, generate
from world.teacher_forcing import (
    BlockMaskAttention,
    TeacherForcing,
    block_causal_mask,
    frame_visibility,
)

CLIP = 9  # three chunks of three frames


@pytest.fixture(scope="module")
def tiny64():
    model = CausalWanModel(WanConfig.preset("tiny")).double().eval()
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    clean = torch.randn(2, cfg.in_channels, CLIP, 16, 16, generator=gen, dtype=torch.float64)
    eps = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, dtype=torch.float64)
    return model, clean, eps, context.expand(2, -1, -1)


def test_frame_visibility_is_block_causal():
    c, n = 1, 0  # clean / noisy visible-ness written out for F = 6, two chunks
    clean_rows = [[c] * 3 + [n] * 3 + [n] * 6] * 3 + [[c] * 6 + [n] * 6] * 3
    noisy_rows = [[n] * 6 + [c] * 3 + [n] * 3] * 3 + [[c] * 3 + [n] * 3 + [n] * 3 + [c] * 3] * 3
    expected = torch.tensor(clean_rows + noisy_rows, dtype=torch.bool)
    assert torch.equal(frame_visibility(6, 3), expected)
    mask = block_causal_mask(6, 3, tokens_per_frame=2)
    assert mask.shape == (24, 24)
    assert torch.equal(mask[::2, ::2], expected) and torch.equal(mask[1::2, ::2], expected)


def test_bad_clip_frames():
    with pytest.raises(ValueError, match="clip_frames"):
        frame_visibility(7, 3)
    model = CausalWanModel(WanConfig.preset("tiny"))
    with pytest.raises(ValueError, match="attention"):
        TeacherForcing(model, 6, attention="sdpa")
    tf = TeacherForcing(model, 6)
    x = torch.zeros(1, 4, 6, 16, 16)
    with pytest.raises(ValueError, match="timestep"):
        tf(x, x, torch.zeros(1, 3), torch.zeros(1, 8, 32))
    with pytest.raises(ValueError, match="noisy"):
        tf(x, x[:, :, :3], torch.zeros(1, 6), torch.zeros(1, 8, 32))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_dense_and_flex_paths_agree(tiny64):
    model, clean, eps, context = tiny64
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64).repeat_interleave(3)
    noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * eps
    t = (1000 * sigma).expand(2, -1).float()
    clean, noisy, t, context = clean[:1, :, :6], noisy[:1, :, :6], t[:1, :6], context[:1]
    dense = TeacherForcing(model, 6, attention="dense")(clean, noisy, t, context)
    flex_model = copy.deepcopy(model).float()
    flex = TeacherForcing(flex_model, 6, attention="flex")
    assert all(isinstance(b.self_attn.attn, BlockMaskAttention) for b in flex_model.blocks)
    with torch.no_grad():  # flex_attention has no CPU backward
        got = flex(clean.float(), noisy.float(), t, context.float())
    torch.testing.assert_close(got.double(), dense, atol=2e-4, rtol=2e-4)


def test_teacher_forcing_equals_prefix_rollout(tiny64):
    """Noisy chunk i of the teacher-forcing pass == the eager rollout's denoising prediction
    for chunk i after committing clean chunks < i, at the same noise (train = infer)."""
    model, clean, eps, context = tiny64
    sigma = torch.tensor([1.0, 0.7, 0.35], dtype=torch.float64).repeat_interleave(3)
    noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * eps
    t = (1000 * sigma).expand(2, -1).float()
    predicted = TeacherForcing(model, CLIP, attention="dense")(clean, noisy, t, context)
    for chunk in range(3):
        frames = slice(3 * chunk, 3 * chunk + 3)
        runner = EagerRunner(model)
        runner.reset(2, "cpu", torch.float64, CLIP)
        for start in range(0, 3 * chunk, 3):
            runner(clean[:, :, start : start + 3], torch.zeros(2, 3), context, start, commit=True)
        rollout = runner(noisy[:, :, frames], t[:, frames], context, 3 * chunk, commit=False)
        torch.testing.assert_close(rollout, predicted[:, :, frames], atol=1e-10, rtol=1e-10)


def test_generate_with_prefix_equals_teacher_forcing(tiny64):
    """One-step sampling after a 6-frame prefix: x0 = noise − v with v from teacher forcing."""
    model, clean, eps, context = tiny64
    seed, cfg = 5, model.config
    noise = torch.randn((2, 4, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    noisy = torch.cat([clean[:, :, :6], noise.double()], dim=2)
    t = torch.tensor([0.0] * 6 + [1000.0] * 3).expand(2, -1)
    flow = TeacherForcing(model, CLIP, attention="dense")(clean, noisy, t, context)
    out = generate(
        EagerRunner(model),
        context,
        1,
        latent_shape=(cfg.in_channels, 16, 16),
        batch_size=2,
        seed=seed,
        schedule=SelfForcingSchedule(denoising_steps=(1000.0,)),
        progress=False,
        prefix=clean[:, :, :6],
    )
    assert out.shape == (2, 4, CLIP, 16, 16)
    assert torch.equal(out[:, :, :6], clean[:, :, :6])
    torch.testing.assert_close(out[:, :, 6:], noise.double() - flow[:, :, 6:], atol=1e-10, rtol=0)


# -- sparse visibility (attention="pbsa") ---------------------------------------------------

GEOMETRY = VideoGeometry(tokens_per_frame=64, frames_per_chunk=3, page_size=32, q_block=32)
SPARSE = PersistentLocal(persistent_blocks=2, window_frames=6, local_topk=3)


def _noisy_inputs(clean, eps, sigmas):
    sigma = torch.tensor(sigmas, dtype=clean.dtype).repeat_interleave(3)
    noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * eps
    return noisy, (1000 * sigma).expand(clean.shape[0], -1).float()


@pytest.fixture(scope="module")
def tiny32(tiny64):
    model, clean, eps, context = tiny64
    return copy.deepcopy(model).float(), clean.float(), eps.float(), context.float()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pbsa_dense_pattern_equals_the_dense_pass_and_its_gradients(tiny32):
    model, clean, eps, context = tiny32
    noisy, t = _noisy_inputs(clean, eps, [0.9, 0.5, 0.2])
    outs, grads = [], []
    for kwargs in ({"attention": "dense"}, {"pattern": Dense(), "geometry": GEOMETRY}):
        m = copy.deepcopy(model).train()
        out = TeacherForcing(m, CLIP, **kwargs)(clean, noisy, t, context)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(_grads(m))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)
    assert sorted(grads[1]) == sorted(grads[0]) and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=2e-5, rtol=1e-4, msg=name)


def test_pbsa_sparse_pass_trains_and_keeps_the_state_dict(tiny32):
    model, clean, eps, context = tiny32
    m = copy.deepcopy(model).train()
    keys = sorted(m.state_dict())
    noisy, t = _noisy_inputs(clean, eps, [0.9, 0.5, 0.2])
    sparse = TeacherForcing(m, CLIP, pattern=SPARSE, geometry=GEOMETRY)
    assert sparse.attention == "pbsa" and sorted(m.state_dict()) == keys
    out = sparse(clean, noisy, t, context)
    dense = TeacherForcing(copy.deepcopy(model), CLIP, attention="dense")(clean, noisy, t, context)
    assert (out - dense).abs().max() > 1e-3  # the pattern hides pages
    out.square().mean().backward()
    grads = _grads(m)
    assert len(grads) == len(list(m.parameters()))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.self_attn.q.weight"].abs().sum() > 0


def test_pbsa_sparse_pass_equals_the_sparse_cached_rollout(tiny32):
    """Noisy chunk i of the sparse teacher-forcing pass == the paged runtime's denoising
    prediction for chunk i after committing the clean chunks < i, same pattern and scorer."""
    model, clean, eps, context = tiny32
    noisy, t = _noisy_inputs(clean, eps, [1.0, 0.6, 0.3])
    runner = reference_runner(
        model, SPARSE, page_size=32, q_block=32, backend="torch", cuda_graphs=False
    )
    gen = torch.Generator().manual_seed(4)
    for state in runner.runtime.states:  # a non-identity scorer, shared by both passes
        with torch.no_grad():
            state.scorer.wq.add_(0.3 * torch.randn(state.scorer.wq.shape, generator=gen))
    scorers = [copy.deepcopy(s.scorer) for s in runner.runtime.states]
    tf = TeacherForcing(
        copy.deepcopy(model), CLIP, pattern=SPARSE, geometry=GEOMETRY, scorers=scorers
    )
    with torch.no_grad():
        predicted = tf(clean, noisy, t, context)
        runner.reset(2, "cpu", torch.float32, CLIP)
        for start in range(0, CLIP, 3):
            frames = slice(start, start + 3)
            rollout = runner(noisy[:, :, frames], t[:, frames], context, start, commit=False)
            torch.testing.assert_close(rollout, predicted[:, :, frames], atol=1e-4, rtol=1e-4)
            runner(clean[:, :, frames], torch.zeros(2, 3), context, start, commit=True)


def test_history_replaces_what_the_noisy_chunks_attend_to_not_the_target(tiny64):
    """flow_matching_loss(..., history): the clean half holds `history`, the target stays the
    clip; no noisy chunk attends to the last chunk of the clean half, so it does not count."""
    from world.teacher_forcing import flow_matching_loss

    model, clean, eps, context = tiny64
    teacher = TeacherForcing(model, CLIP, attention="dense")
    sigma = torch.tensor([[0.9, 0.5, 0.2]] * 2, dtype=torch.float64)
    loss = flow_matching_loss(teacher, clean, eps, sigma, context)
    assert torch.equal(flow_matching_loss(teacher, clean, eps, sigma, context, clean), loss)
    last = clean.clone()
    last[:, :, -3:] = torch.randn_like(last[:, :, -3:])
    torch.testing.assert_close(flow_matching_loss(teacher, clean, eps, sigma, context, last), loss)
    middle = clean.clone()
    middle[:, :, 3:6] += 0.5
    assert (flow_matching_loss(teacher, clean, eps, sigma, context, middle) - loss).abs() > 1e-6
