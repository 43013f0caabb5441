"""Block scorer training by self-distillation from dense attention.

A layer's ``BlockScorer`` sees only block means, so it is trained to predict, for every query
block, how the dense attention of the real tokens distributes over key blocks::

    target[b,h,m,:] = block_attention_mass(q, k)          (what the tokens really do)
    pred[b,h,m,:]   = softmax_n(block_logits(q̄_m, k̄_n))   (what the scorer can see)
    loss            = KL(target ‖ pred), rows weighted by their token count

The scorer only touches block representatives, so the dense targets and the pooled inputs
are computed once up front and every optimisation step is cheap.

Recall is reported against its ceiling: the *oracle* selects each query block's top key
blocks by the true mass itself, which no scorer can beat. Where many heads attend almost
uniformly (as in a small trained model), the oracle itself keeps little more than the
selected fraction of the mass, and a scorer should be judged by how close it gets to it.

Samples are ``(q, k)`` pairs in BLHD: q ``[B, Lq, H, D]`` (the queries of one attention call)
and k ``[B, Lk, Hkv, D]`` (all keys those queries attend to, contiguous; key block n is tokens
``[n·kv_block, (n+1)·kv_block)``), e.g. recorded from any model by ``capture_qk``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from patterns.diagnostics import topk_recall
from patterns.scoring import (
    BlockScorer,
    block_attention_mass,
    pool_key_blocks,
    pool_query_blocks,
    query_block_rows,
)

__all__ = ["QKSample", "capture_qk", "recall_table", "scorer_recall", "train_scorers"]

QKSample = tuple[Tensor, Tensor] | Mapping[str, Tensor]
"""One captured attention call: ``(q, k)`` or ``{"q": q, "k": k}``, BLHD."""


@dataclass
class _Prepared:
    """Samples reduced to what the scorer needs: pooled reps and the dense target.

    Samples of equal block shape are concatenated along the batch, so each optimisation
    step runs a handful of batched ops instead of a few per captured call.
    """

    q_reps: Tensor  # [B, H, M, D]
    k_reps: Tensor  # [B, Hkv, N, D]
    mass: Tensor  # [B, H, M, N] float32, rows sum to 1
    target_xlogx: Tensor  # [B, H, M] Σ_n t·log t, the parameter-free part of the KL
    row_weights: Tensor  # [M] rows per query block / Lq


def _unpack(sample: Any, where: str) -> tuple[Tensor, Tensor]:
    if isinstance(sample, Mapping):
        if "q" not in sample or "k" not in sample:
            raise ValueError(f"{where} must have keys 'q' and 'k', got {sorted(sample)}")
        return sample["q"], sample["k"]
    if isinstance(sample, Sequence) and len(sample) >= 2:
        return sample[0], sample[1]
    raise TypeError(f"{where} must be a (q, k) pair or a dict with 'q' and 'k'")


def _prepare(
    scorer: BlockScorer, samples: Sequence[Any], where: str, q_block: int, kv_block: int
) -> list[_Prepared]:
    """Validate and reduce one layer's samples, grouped by (Lq, M, N)."""
    if len(samples) == 0:
        raise ValueError(f"{where} is empty")
    device = scorer.wq.device
    groups: dict[tuple[int, ...], list[_Prepared]] = {}
    for i, sample in enumerate(samples):
        q, k = _unpack(sample, f"{where}[{i}]")
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"{where}[{i}]: {name} must be a 4-D BLHD tensor")
        if q.shape[2] != scorer.num_heads or k.shape[2] != scorer.num_kv_heads:
            raise ValueError(
                f"{where}[{i}]: q/k heads ({q.shape[2]}, {k.shape[2]}) do not match the "
                f"scorer's (H={scorer.num_heads}, Hkv={scorer.num_kv_heads})"
            )
        with torch.no_grad():
            mass = block_attention_mass(q, k, q_block, kv_block).float().to(device)
            rows = query_block_rows(q.shape[1], q_block, device=device).float() / q.shape[1]
            item = _Prepared(
                q_reps=pool_query_blocks(q, q_block).float().to(device),
                k_reps=pool_key_blocks(k, kv_block).float().to(device),
                mass=mass,
                target_xlogx=torch.special.xlogy(mass, mass).sum(-1),
                row_weights=rows,
            )
        groups.setdefault((q.shape[1], *mass.shape[2:]), []).append(item)
    return [
        _Prepared(
            q_reps=torch.cat([it.q_reps for it in items]),
            k_reps=torch.cat([it.k_reps for it in items]),
            mass=torch.cat([it.mass for it in items]),
            target_xlogx=torch.cat([it.target_xlogx for it in items]),
            row_weights=items[0].row_weights,
        )
        for items in groups.values()
    ]


def _kl_loss(scorer: BlockScorer, groups: Sequence[_Prepared]) -> Tensor:
    """KL(target ‖ pred) per (batch, head) row, rows weighted by tokens, averaged."""
    total, count = 0.0, 0
    for item in groups:
        log_pred = scorer.block_logits(item.q_reps, item.k_reps).log_softmax(-1)
        kl_rows = item.target_xlogx - (item.mass * log_pred).sum(-1)  # [B, H, M]
        total = total + (kl_rows * item.row_weights).sum()
        count += kl_rows.shape[0] * kl_rows.shape[1]
    return total / count


def _resolve_topk(topk: int | float, num_blocks: int) -> int:
    if isinstance(topk, float):
        return max(1, min(num_blocks, math.ceil(topk * num_blocks)))
    return min(topk, num_blocks)


def _recall(scorer: BlockScorer | None, groups: Sequence[_Prepared], topk: int | float) -> float:
    """Top-K recall averaged over heads and batch entries of all samples; ``scorer`` None
    ranks by the true mass (the oracle)."""
    with torch.no_grad():
        total, count = 0.0, 0
        for item in groups:
            scores = item.mass if scorer is None else scorer.block_logits(item.q_reps, item.k_reps)
            recall = topk_recall(
                scores,
                item.mass,
                _resolve_topk(topk, item.mass.shape[-1]),
                row_weights=item.row_weights,
            )
            total += float(recall.mean()) * item.mass.shape[0]
            count += item.mass.shape[0]
    return total / count


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the optimisation steps on one intra-op thread: each is a few hundred
    tiny ops, and a thread pool only adds barrier waits (seconds per step on a loaded
    2-core machine instead of milliseconds)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_scorers(scorers: Sequence[BlockScorer]) -> list[BlockScorer]:
    scorers = list(scorers)
    if not scorers or not all(isinstance(s, BlockScorer) for s in scorers):
        raise TypeError("scorers must be a non-empty sequence of BlockScorer")
    return scorers


def _check_topk(topk: int | float) -> None:
    if isinstance(topk, bool) or not (
        (isinstance(topk, int) and topk >= 1) or (isinstance(topk, float) and 0 < topk <= 1)
    ):
        raise ValueError(f"topk must be an int >= 1 or a float in (0, 1], got {topk!r}")


def _prepare_layers(
    scorers: list[BlockScorer],
    per_layer: Sequence[Sequence[QKSample]],
    name: str,
    q_block: int,
    kv_block: int,
) -> list[list[_Prepared]]:
    if len(per_layer) != len(scorers):
        raise ValueError(
            f"{name} must hold one sequence of samples per scorer ({len(scorers)}), "
            f"got {len(per_layer)}"
        )
    return [
        _prepare(scorer, layer_samples, f"{name}[{layer}]", q_block, kv_block)
        for layer, (scorer, layer_samples) in enumerate(zip(scorers, per_layer, strict=True))
    ]


def recall_table(
    scorer_sets: Mapping[str, Sequence[BlockScorer]],
    samples: Sequence[Sequence[QKSample]],
    *,
    q_block: int,
    kv_block: int,
    topk: Sequence[int | float] = (0.25, 0.125),
) -> dict[str, dict[int | float, float]]:
    """Recall of several scorer sets and of the oracle on the same samples.

    scorer_sets: name -> one scorer per layer (all sets of the same layout; "oracle" is
    reserved). Returns ``{"oracle": {size: recall}, name: {size: recall}, ...}``: for each
    selection size in ``topk`` (as in ``train_scorers``), the dense attention mass inside every
    query block's top key blocks, averaged over layers, heads and samples. The dense targets
    are computed once for every set and size.
    """
    if not isinstance(scorer_sets, Mapping) or not scorer_sets:
        raise TypeError("scorer_sets must be a non-empty mapping of name -> scorers")
    if "oracle" in scorer_sets:
        raise ValueError('scorer_sets: the name "oracle" is reserved for the ceiling')
    sets = {name: _check_scorers(scorers) for name, scorers in scorer_sets.items()}
    first = next(iter(sets.values()))
    for name, scorers in sets.items():
        layout = [(s.num_heads, s.num_kv_heads, s.head_dim) for s in scorers]
        if layout != [(s.num_heads, s.num_kv_heads, s.head_dim) for s in first]:
            raise ValueError(f"scorer_sets[{name!r}] differs in layout from the first set")
    for size in topk:
        _check_topk(size)
    items = _prepare_layers(first, samples, "samples", q_block, kv_block)
    table = {}
    for name, scorers in {"oracle": [None] * len(first), **sets}.items():
        table[name] = {
            size: sum(_recall(s, layer, size) for s, layer in zip(scorers, items, strict=True))
            / len(items)
            for size in topk
        }
    return table


def scorer_recall(
    scorers: Sequence[BlockScorer],
    samples: Sequence[Sequence[QKSample]],
    *,
    q_block: int,
    kv_block: int,
    topk: Sequence[int | float] = (0.25, 0.125),
) -> dict[int | float, float]:
    """``recall_table`` of one scorer set: ``{size: recall}``."""
    table = recall_table(
        {"scorers": scorers}, samples, q_block=q_block, kv_block=kv_block, topk=topk
    )
    return table["scorers"]


def train_scorers(
    scorers: Sequence[BlockScorer],
    samples: Sequence[Sequence[QKSample]],
    *,
    q_block: int,
    kv_block: int,
    steps: int,
    lr: float,
    topk: int | float = 0.25,
    weight_decay: float = 0.0,
    eval_samples: Sequence[Sequence[QKSample]] | None = None,
    val_samples: Sequence[Sequence[QKSample]] | None = None,
    eval_every: int = 25,
    patience: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Train each layer's scorer to predict its dense block attention mass.

    scorers: one ``BlockScorer`` per layer. samples: per layer, a sequence of captured
    ``(q, k)`` pairs (or ``{"q", "k"}`` dicts), q ``[B, Lq, H, D]``, k ``[B, Lk, Hkv, D]``
    BLHD (see the module doc). Every step is one AdamW update on the KL of all samples of
    all layers (full batch: the scorer works on block means only, so this stays cheap).

    Early stopping: with ``val_samples`` (same format, other scenes than ``samples``) the
    validation KL is measured every ``eval_every`` steps; training stops after ``patience``
    measurements without improvement and the scorers keep the parameters of the best one.

    Recall is measured before and after at a fixed selection size ``topk`` per query block
    (an int number of key blocks, or a float fraction of them, rounded up) on
    ``eval_samples`` (same format) or, if not given, on ``samples``, next to the oracle's.

    Returns ``{"loss": [one float per step run], "val_loss": [(step, float)], "best_step":
    int, "recall_before": [per layer], "recall_after": [per layer], "recall_oracle": [per
    layer], "mean_recall_before", "mean_recall_after", "mean_recall_oracle": float}``.
    """
    scorers = _check_scorers(scorers)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    for value, name in ((eval_every, "eval_every"), (patience, "patience")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_topk(topk)

    def prepare_all(per_layer: Sequence[Sequence[QKSample]], name: str) -> list[list[_Prepared]]:
        return _prepare_layers(scorers, per_layer, name, q_block, kv_block)

    def mean_kl(items: list[list[_Prepared]]) -> Tensor:
        return torch.stack(
            [_kl_loss(s, groups) for s, groups in zip(scorers, items, strict=True)]
        ).mean()

    train_items = prepare_all(samples, "samples")
    eval_items = train_items if eval_samples is None else prepare_all(eval_samples, "eval_samples")
    val_items = None if val_samples is None else prepare_all(val_samples, "val_samples")

    def recalls(scorer_list: Sequence[BlockScorer | None]) -> list[float]:
        return [_recall(s, items, topk) for s, items in zip(scorer_list, eval_items, strict=True)]

    recall_before = recalls(scorers)
    params = [p for s in scorers for p in s.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    best: tuple[float, int, list[Tensor]] | None = None  # (val KL, step, parameters)

    def validate(step: int) -> bool:
        """Record the validation KL after ``step`` steps; True when training should stop."""
        nonlocal best
        with torch.no_grad():
            value = float(mean_kl(val_items))
        val_losses.append((step, value))
        if best is None or value < best[0]:
            best = (value, step, [p.detach().clone() for p in params])
        stale = sum(1 for s, _ in val_losses if s > best[1])
        return stale >= patience

    if val_items is not None:
        validate(0)
    with (
        torch.enable_grad(),
        _one_cpu_thread(params[0].device),
        tqdm(range(steps), desc="train scorers", disable=not progress) as bar,
    ):
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = mean_kl(train_items)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            done = step + 1
            due = val_items is not None and (done % eval_every == 0 or done == steps)
            if due and validate(done):
                break
    if best is not None:
        with torch.no_grad():
            for param, value in zip(params, best[2], strict=True):
                param.copy_(value)
    recall_after = recalls(scorers)
    recall_oracle = recalls([None] * len(scorers))
    return {
        "loss": losses,
        "val_loss": val_losses,
        "best_step": len(losses) if best is None else best[1],
        "recall_before": recall_before,
        "recall_after": recall_after,
        "recall_oracle": recall_oracle,
        "mean_recall_before": sum(recall_before) / len(recall_before),
        "mean_recall_after": sum(recall_after) / len(recall_after),
        "mean_recall_oracle": sum(recall_oracle) / len(recall_oracle),
    }


def _qk_from_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    q = kwargs.get("q", kwargs.get("query", args[0] if args else None))
    k = kwargs.get("k", kwargs.get("key", args[1] if len(args) > 1 else None))
    if not isinstance(q, Tensor) or not isinstance(k, Tensor):
        raise TypeError(
            "capture_qk: the hooked module must be called with q and k as its first two "
            "positional arguments or as q=/k= (query=/key=) keywords"
        )
    return q, k


@contextmanager
def capture_qk(
    modules: Sequence[nn.Module], *, device: torch.device | str = "cpu"
) -> Iterator[list[list[tuple[Tensor, Tensor]]]]:
    """Record ``(q, k)`` at every call of the given self-attention modules.

    modules: one module per layer, each called as ``module(q, k, v, ...)`` with BLHD
    ``q [B, Lq, H, D]`` and ``k [B, Lk, Hkv, D]`` (positionally or as ``q=``/``k=``).
    Yields a list with one list per module, filled during the ``with`` block with detached
    copies on ``device`` — exactly the ``samples`` format of ``train_scorers``. The hooks are
    removed on exit, also after an error.
    """
    modules = list(modules)
    if not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("modules must be a sequence of nn.Module")
    records: list[list[tuple[Tensor, Tensor]]] = [[] for _ in modules]

    def make_hook(store: list[tuple[Tensor, Tensor]]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k = _qk_from_call(args, kwargs)
            store.append((q.detach().to(device, copy=True), k.detach().to(device, copy=True)))

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(store), with_kwargs=True)
        for m, store in zip(modules, records, strict=True)
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
