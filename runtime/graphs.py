"""`PassGraphs`: CUDA-graph replay of whole passes of a `StatefulRunner`.

A sparse pass launches a few thousand small kernels (per layer: scratch writes, pooling,
scoring, top-K, the block table, PBSA), and enqueueing them from Python takes longer than the
GPU takes to run them. A CUDA graph records the launches once and replays them for the cost of
one.

What a replay may reuse is exactly what the capture baked in: the inputs' shapes and dtypes,
the phase, and each layer's ``AttentionState.signature()`` (its history relative to the
chunk and its counts). The chunk's position is read from the runtime's ``start`` tensor and
the cache lives in buffers updated in place, so one graph serves every chunk of the steady
state of a rollout, and the four denoising passes of any chunk. The first pass of each
phase and input shape runs eagerly (it compiles kernels and fills host-side caches); after
that a new key is captured at once (an idempotent pass — one whose device work may run
twice, such as a denoising pass — runs eagerly first: work that cannot happen under capture,
the kernels' autotuning, cuDNN's plans, then happens for that key too), and a known key
replays. A replayed commit pass then
redoes the host side of every layer's commit (``AttentionState.replay_commit``). Graphs
outlive ``reset`` as long as the runtime keeps its buffers (same sizes), so a second rollout
of the same shape replays from its first pass.

All graphs share one memory pool: nothing a graph computes is needed after its replay (the
output is copied out at once), so their activations may overlap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PassGraphs"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


def _meta(t: Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


class PassGraphs:
    """Captured passes of one runtime, keyed by what their device work depends on.

    max_graphs: graphs kept (least recently used dropped first). A rollout's steady state
        needs two (denoise, commit); the chunks before it need two each.
    """

    def __init__(self, max_graphs: int = 64):
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._warm: set[tuple] = set()
        self._memory = None  # the shared pool and capture stream, made at the first capture
        self._stream = None
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        """Drop every graph (after a reset that reallocated the buffers they read)."""
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self,
        phase: Hashable,
        signature: Hashable,
        pass_fn: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        before_capture: Callable[[], None],
        after_replay: Callable[[], None],
        idempotent: bool = False,
    ) -> Tensor:
        """One pass: ``pass_fn(*inputs)`` eagerly, captured or replayed (see the module
        docstring). A graph is keyed by ``phase``, the runtime's ``signature`` and the input
        shapes; the first pass of each phase and input shape runs eagerly. ``before_capture``
        drops host-side memos of device values (a capture must compute them inside the
        graph); ``after_replay`` redoes the host side effects of a replayed pass (a capture ran
        them already). idempotent: the pass may run twice (the next replay repeats its device
        work): its first pass of every key runs eagerly, then is captured at once (the
        result is the eager one), so that work a capture cannot do (timing, cuDNN's plans)
        happens for every key. Returns a fresh output tensor."""
        metas = tuple(_meta(t) for t in inputs)
        key = (phase, signature, metas)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            for static, value in zip(entry.inputs, inputs, strict=True):
                static.copy_(value)
            before_capture()  # eager passes must not read memos that live in a graph's pool
            entry.graph.replay()
            self.replays += 1
            after_replay()
            return entry.output.clone()
        warm = key if idempotent else (phase, metas)
        if warm not in self._warm:
            output = pass_fn(*inputs)
            self._warm.add(warm)  # only after a pass that succeeded eagerly
            if idempotent:
                self._capture(key, pass_fn, inputs, before_capture, replay=False)
            return output
        return self._capture(key, pass_fn, inputs, before_capture).output.clone()

    def _capture(
        self,
        key: tuple,
        pass_fn: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        before_capture: Callable[[], None],
        replay: bool = True,
    ) -> _Graph:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        static = tuple(t.clone() for t in inputs)
        before_capture()
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory, stream=self._stream):
            output = pass_fn(*static)
        # the capture recorded the work without running it (its host side effects ran)
        if replay:
            graph.replay()
        self.captures += 1
        entry = self._graphs[key] = _Graph(graph, static, output)
        return entry
