"""`CompiledDenseRunner`: Self-Forcing's dense rollout made as fast as a speed-minded user
would make it — the strongest dense baseline (`bench.rollout`'s ``dense_compiled``).

What it does beyond `runtime.eager.EagerRunner` (same model, same frames attended):

* the cache is a `runtime.ring_cache.RingFrameCache`: fixed buffers, a chunk written in
  place where the dropped frames were (no compaction copies; every address stays put);
* each layer's self-attention (the cache write and SDPA on the attended prefix) runs eagerly
  on a chosen SDPA backend (cuDNN by default) or FlashAttention-4's forward ("fa4", where
  flash-attn-4 is installed); everything else of each block is under
  ``torch.compile`` (one compiled code shared by the blocks, weights as inputs);
* on CUDA every pass is replayed from a CUDA graph (``runtime.graphs.PassGraphs``), one per
  attended length: 7 for Self-Forcing's 21-frame window (6 while it fills, then one for the
  steady state; the denoising and the commit passes do the same device work).

The user's model is not modified: the runner holds a structural copy whose parameters and
buffers are the model's own tensors (no weight memory is duplicated).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from patterns import CachePolicy
from runtime.eager import SELF_FORCING_WINDOW_FRAMES, DenseRunnerBase
from runtime.graphs import PassGraphs
from runtime.model import CausalWanModel
from runtime.ring_cache import RingFrameCache

__all__ = ["SDPA_BACKENDS", "CompiledDenseRunner", "fa4_forward"]

SDPA_BACKENDS = ("cudnn", "flash", "efficient", "auto", "fa4")


def fa4_forward():
    """flash-attn-4's forward `f(q, k, v, **options) -> out` on BLHD tensors (GQA native;
    options go to `flash_attn.cute.flash_attn_func`, e.g. block_sparse_tensors): a clear
    ImportError where the optional package is missing."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as error:
        raise ImportError(
            "sdpa_backend='fa4' needs flash-attn-4 (pip install flash-attn-4 "
            "'nvidia-cutlass-dsl[cu13]'), a Hopper or Blackwell GPU; it could not be imported: "
            f"{error}"
        ) from error

    def forward(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
        out = flash_attn_func(q, k, v, **options)
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in some versions

    return forward


def _sdpa_backends(name: str) -> list | None:
    """The `torch.nn.attention.SDPBackend`s of a backend name (None: PyTorch's choice)."""
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "auto": None,
    }[name]


class _RingAttention(nn.Module):
    """Layer ``layer``'s self-attention over the ring cache: writes the chunk's k, v, then
    the model's own attention spelling over the attended prefix.

    Kept out of ``torch.compile``: the write is an in-place copy into a buffer the compiler
    must not functionalise (it would copy the whole cache), and SDPA runs on the backend
    chosen here, not the one the compiler happened to trace. "fa4" replaces the model's
    spelling by FA4's forward on CUDA (the same unmasked attention over the prefix).
    """

    def __init__(self, cache: RingFrameCache, layer: int, attend: nn.Module, backend: str):
        super().__init__()
        self.cache, self.layer, self.attend = cache, layer, attend
        self._fa4 = fa4_forward() if backend == "fa4" else None
        self._backends = None if backend == "fa4" else _sdpa_backends(backend)

    @torch.compiler.disable
    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None:
            raise ValueError("attn_mask: the cached chunk form takes no mask")
        k, v = self.cache.write(self.layer, k, v)
        if self._fa4 is not None and q.is_cuda:
            return self._fa4(q, k, v)
        if self._backends is None or not q.is_cuda:
            return self.attend(q, k, v)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self._backends):
            return self.attend(q, k, v)


def _bind(model: CausalWanModel, cache: RingFrameCache, backend: str) -> CausalWanModel:
    """A copy of ``model``'s modules sharing its parameters and buffers, whose layer i
    self-attention is a `_RingAttention` of layer i."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    bound = copy.deepcopy(model, shared)
    for i, block in enumerate(bound.blocks):
        block.self_attn.attn = _RingAttention(cache, i, block.self_attn.attn, backend)
    return bound


class CompiledDenseRunner(DenseRunnerBase):
    """A ``ChunkRunner`` of ``model`` with Self-Forcing's dense cache, compiled and graphed.

    policy: the frames kept (a `patterns.CachePolicy` without persistent memory; default
        Self-Forcing's 21-frame window, the global cache while a video fits it).
    compile: ``torch.compile`` each block (all but its self-attention); compile_options go
        to ``torch.compile``. cuda_graphs: replay passes on CUDA as CUDA graphs.
    sdpa_backend: one of ``SDPA_BACKENDS`` for the self-attention ("auto": PyTorch's pick;
        "fa4": FlashAttention-4's forward, an optional package, checked here).

    Chunks must come in order, as for `EagerRunner`; a rejected call raises before touching
    the cache. Outputs equal `EagerRunner`'s up to rounding (the keys are attended in slot
    order, not frame order).
    """

    _name = "CompiledDenseRunner"

    def __init__(
        self,
        model: CausalWanModel,
        policy: CachePolicy | None = None,
        *,
        compile: bool = True,
        cuda_graphs: bool = True,
        sdpa_backend: str = "cudnn",
        compile_options: dict | None = None,
    ):
        super().__init__(model)
        for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, got {sdpa_backend!r}")
        if sdpa_backend == "fa4":
            fa4_forward()  # a missing package fails here, before anything is built
        policy = CachePolicy(SELF_FORCING_WINDOW_FRAMES) if policy is None else policy
        self.cache = RingFrameCache(policy)
        self.sdpa_backend = sdpa_backend
        self.cuda_graphs = cuda_graphs
        self.graphs = PassGraphs()
        self._bound = _bind(model, self.cache, sdpa_backend)
        if compile:
            for block in self._bound.blocks:
                block.compile(**(compile_options or {}))
        self._start: Tensor | None = None  # the chunk's first frame, int64 on the device

    def self_attention_modules(self) -> list[nn.Module]:
        """Each layer's self-attention (cache write and SDPA), in layer order."""
        return [block.self_attn.attn for block in self._bound.blocks]

    def _reset_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype, num_frames: int
    ) -> torch.device:
        """Buffers (and the CUDA graphs over them) are kept when the layout repeats."""
        cfg = self.model.config
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        like = torch.empty((), device=device, dtype=dtype).expand(
            batch_size, cfg.num_kv_heads, cfg.head_dim
        )
        before = self.cache.buffer_addresses()
        self.cache.reset(
            cfg.num_layers, cfg.tokens_per_frame, cfg.frames_per_chunk, num_frames, like
        )
        if self._start is None or self._start.device != device:
            self._start = torch.zeros((), dtype=torch.int64, device=device)
            self.graphs.clear()
        if self.cache.buffer_addresses() != before:
            self.graphs.clear()  # captured over buffers that are gone
        return device

    def _pass(self, x: Tensor, timestep: Tensor, context: Tensor, start: int, slots) -> Tensor:
        # slots is None: each layer's _RingAttention writes to the ring cache itself
        graphed = self.cuda_graphs and x.is_cuda and timestep.is_cuda and context.is_cuda
        if not graphed:
            return self._bound(x, timestep, context, start)
        # RoPE reads the chunk's position from the device, so one graph serves every chunk
        # that attends to as many tokens (denoising and commit passes alike)
        self._start.fill_(start)
        return self.graphs.run(
            "pass",
            self.cache.attended_tokens,
            lambda *inputs: self._bound(*inputs, self._start),
            (x, timestep, context),
            before_capture=lambda: None,
            after_replay=lambda: None,
            idempotent=True,  # the cache write repeats the same values
        )

    def __repr__(self) -> str:
        return (
            f"CompiledDenseRunner({self.cache!r}, sdpa_backend={self.sdpa_backend!r}, "
            f"cuda_graphs={self.cuda_graphs})"
        )
