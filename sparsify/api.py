"""`sparsify(model, ...)`: capture, find, classify, rewrite — and the module it returns.

Two modes:

* ``mode="cached"`` (default) — an autoregressive chunk-form model ``forward(x, timestep,
  context, start_frame)``. Every self-attention site becomes a `runtime.AttentionState` of one
  `runtime.AttentionRuntime` (shared page pool), and the returned `SparsifiedModule` is a
  `ChunkRunner`: ``reset(...)`` then ``module(x, timestep, context, start_frame, commit)``,
  driven by `runtime.generate`.
* ``mode="full_sequence"`` — a bidirectional model run on a whole video, no cache (e.g.
  diffusers' ``WanTransformer3DModel``). Each self-attention site becomes a
  `runtime.FullSequenceAttention`; the module is called like the original model.

The user's model is never modified: the graph owns its module objects (sharing weight storage).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from codegen.api import BACKENDS
from patterns import Pattern, VideoGeometry
from runtime import AttentionRuntime, CausalWanModel, FullSequenceAttention
from runtime.parallel import HeadParallelRuntime, stateful_runner
from sparsify.capture import CAPTURE_METHODS
from sparsify.classify import SELF, Verdict, classify, keep_reason
from sparsify.defaults import default_geometry
from sparsify.frames import VideoGrid, check_geometry, video_grid
from sparsify.inputs import capture_inputs, graph_inputs, input_name
from sparsify.ops import bind
from sparsify.plan import KEPT, REWRITTEN, Plan, PlanRow
from sparsify.rewrite import rebind, rewrite
from sparsify.sites import AttentionSite, find_sites
from sparsify.spans import joint_reason

MODES = ("cached", "full_sequence")
PARALLEL = (None, "heads")
OPTIONS = (
    "mode", "page_size", "q_block", "debug", "capture_methods", "cuda_graphs", "allow_dense",
    "parallel", "autotune",
)  # fmt: skip
FORMS = (
    "scaled_dot_product_attention (any spelling)",
    "flex_attention",
    "flash-attn ops",
    "unfused softmax(q·kᵀ)·v",
)


class SparsifiedModule(nn.Module):
    """A captured model whose self-attention runs on the sparse runtime.

    graph_module: the rewritten fx graph (its parameters are the model's weights, shared).
    plan: a `Plan`, one row per attention site.
    In cached mode `runner` (a `runtime.StatefulRunner`) drives `runtime`, the
    `AttentionRuntime` whose `states` (one per rewritten layer, with the learned block scorers) are
    submodules; in full-sequence mode `attention` lists the `FullSequenceAttention` modules.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        plan: Plan,
        attention: AttentionRuntime | nn.ModuleList,
        site_ids: Mapping[int, int],
        constants: Mapping[int | str, tuple[str, int]] | None = None,
    ):
        super().__init__()
        # int inputs specialised into the graph: position or keyword → (name, value)
        self.constants = dict(constants or {})
        self.graph_module = graph_module
        self.plan = plan
        self.site_ids = dict(site_ids)  # plan row (site index) → id bound in sparsify.ops
        if isinstance(attention, AttentionRuntime):
            self.runner = stateful_runner(self._chunk, attention)
        else:
            self.attention = attention

    @property
    def mode(self) -> str:
        """ "cached" (an AR runner with a KV cache) or "full_sequence" (the plan's mode)."""
        return self.plan.mode

    @property
    def runtime(self) -> AttentionRuntime:
        if self.mode != "cached":
            raise AttributeError("a full_sequence SparsifiedModule has no AttentionRuntime")
        return self.runner.runtime

    @property
    def cuda_graphs(self) -> bool:
        """Whether passes on CUDA replay as CUDA graphs (cached mode; see `runtime.graphs`).
        Always False in full-sequence mode, which runs every call eagerly."""
        return self.runner.cuda_graphs if self.mode == "cached" else False

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"cuda_graphs: expected a bool, got {type(value).__name__}")
        if self.mode == "cached":
            self.runner.cuda_graphs = value
        elif value:
            raise ValueError("cuda_graphs: full_sequence mode does not replay CUDA graphs")

    @property
    def max_frames(self) -> int | None:
        """The most frames a rollout may span (cached mode): the reference model's RoPE
        limit, as for its `runtime.EagerRunner`; None (no known limit) for other models."""
        return self.runtime.max_frames

    @property
    def peak_kv_bytes(self) -> int:
        return self.runtime.peak_kv_bytes

    @property
    def current_kv_bytes(self) -> int:
        return self.runtime.current_kv_bytes

    def _chunk(self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int) -> Tensor:
        args, _ = graph_inputs((x, timestep, context, start_frame), {}, self.constants)
        return self.graph_module(*args)

    def reset(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, num_frames: int
    ) -> None:
        """Empty the KV cache for a rollout of `num_frames` frames (cached mode only)."""
        if self.mode != "cached":
            raise RuntimeError("reset: a full_sequence SparsifiedModule has no KV cache")
        dense = [r for r in self.plan.rows if r.kind == SELF and r.decision == KEPT]
        if dense:
            listing = "; ".join(f"site {r.site} ({r.module_path}): {r.reason}" for r in dense)
            raise RuntimeError(
                "the AR rollout needs every self-attention site on the KV cache, but these "
                f"were kept dense: {listing}"
            )
        self.runner.reset(batch_size, device, dtype, num_frames)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Cached mode: ``(x, timestep, context, start_frame, commit)``, one pass over a chunk
        (the `ChunkRunner` protocol). Full-sequence mode: the original model's arguments."""
        if self.mode == "cached":
            return self.runner(*args, **kwargs)
        args, kwargs = graph_inputs(args, kwargs, self.constants)
        return self.graph_module(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`torch.compile` the rewritten graph in place (arguments as for `torch.compile`).

        Only the graph is compiled: the runner's cache bookkeeping is Python state that must
        run around it, not be traced into it.
        """
        self.graph_module.compile(*args, **kwargs)

    def _attention_modules(self) -> list[nn.Module]:
        """The attention module of each rewritten site, in `site_ids` order."""
        return list(self.runtime.states if self.mode == "cached" else self.attention)

    def __deepcopy__(self, memo: dict) -> SparsifiedModule:
        # A plain deep copy would leave the copied graph calling the original's attention
        # states (site ids are constants in the graph): bind the copies and patch the graph.
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        fresh = {
            site: bind(module)
            for site, module in zip(clone.site_ids, clone._attention_modules(), strict=True)
        }
        rebind(clone.graph_module, {self.site_ids[site]: fresh[site] for site in fresh})
        clone.site_ids = fresh
        return clone

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, {len(self.plan.rewritten)}/{len(self.plan.rows)} rewritten"


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs: expected a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _geometry(model: nn.Module, geometry: VideoGeometry | None, options: dict) -> VideoGeometry:
    if geometry is not None:
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(
                f"geometry: expected a patterns.VideoGeometry, got {type(geometry).__name__}"
            )
        if "page_size" in options or "q_block" in options:
            raise ValueError("page_size/q_block: give them in the geometry, not as options")
        return geometry
    if not isinstance(model, CausalWanModel):
        raise ValueError(
            f"geometry: required for a {type(model).__name__} (only the reference "
            "CausalWanModel's geometry is known); pass patterns.VideoGeometry(tokens_per_frame, "
            "frames_per_chunk, page_size, q_block)"
        )
    cfg = model.config
    default = default_geometry(cfg.tokens_per_frame, cfg.frames_per_chunk)
    return dataclasses.replace(
        default,
        page_size=options.get("page_size", default.page_size),
        q_block=options.get("q_block", default.q_block),
    )


def _mode_reason(
    site: AttentionSite, geometry: VideoGeometry, mode: str, grid: VideoGrid | None
) -> str | None:
    length = site.q_shape[1]
    if mode == "cached" and length != geometry.chunk_tokens:
        return (
            f"{length} query tokens, not one chunk of {geometry.frames_per_chunk}x"
            f"{geometry.tokens_per_frame} = {geometry.chunk_tokens} (geometry mismatch)"
        )
    if mode == "full_sequence" and length % geometry.tokens_per_frame:
        return f"{length} tokens are not whole frames of {geometry.tokens_per_frame} tokens"
    if mode == "full_sequence" and grid is not None and length != grid.tokens:
        return f"{length} tokens, but the video has {grid}: the sequence is not only the video"
    return None


def _heads(site: AttentionSite) -> tuple[int, int, int]:
    return site.q_shape[2], site.k_shape[2], site.q_shape[3]


def _decide(
    sites: list[AttentionSite], verdicts: dict[int, Verdict], graph_module: GraphModule,
    geometry: VideoGeometry, mode: str, grid: VideoGrid | None,
) -> dict[int, str | None]:  # fmt: skip
    """site index → reason to keep it dense, or None to rewrite it."""
    reasons: dict[int, str | None] = {}
    shared: tuple[int, int, int] | None = None
    for site in sites:
        reason = keep_reason(site, verdicts.get(site.index))
        reason = reason or joint_reason(site, sites, graph_module)
        reason = reason or _mode_reason(site, geometry, mode, grid)
        if reason is None and mode == "cached":
            # One page pool serves every layer, so they must agree on heads and head_dim.
            shared = shared or _heads(site)
            if _heads(site) != shared:
                reason = f"(H, Hkv, D) = {_heads(site)} differs from the other layers' {shared}"
        reasons[site.index] = reason
    return reasons


def sparsify(
    model: nn.Module,
    example_inputs: Any,
    pattern: Pattern,
    geometry: VideoGeometry | None = None,
    backend: str = "auto",
    **options: Any,
) -> SparsifiedModule:
    """Capture `model`, rewrite its self-attention to `pattern`, return a `SparsifiedModule`.

    example_inputs: a tuple of positional inputs (cached mode: ``(x, timestep, context,
        start_frame)``) or a dict of keyword inputs; ints become runtime tensor inputs.
    pattern: a `patterns.Pattern` (e.g. ``Dense()``, ``PersistentLocal(...)``).
    geometry: the video geometry; defaults from a `runtime.CausalWanModel`'s config
        (tokens_per_frame, frames_per_chunk), otherwise required.
    backend: kernel backend, one of ``codegen.api.BACKENDS`` ("auto": triton on CUDA, torch on
        CPU).
    options: ``mode`` ("cached" | "full_sequence"), ``page_size``/``q_block`` (when the
        geometry is derived from the model; default `sparsify.defaults.default_geometry`'s),
        ``debug`` (validate block tables), ``cuda_graphs`` (cached mode on CUDA: replay
        passes as CUDA graphs, default True; see `runtime.graphs`), ``autotune`` (cached mode
        on CUDA: the first call of each kernel shape bucket without a stored winner times the
        candidate launch configs and keeps the fastest, default True; see
        `runtime.AttentionRuntime.autotune`),
        ``capture_methods`` (subset of `sparsify.capture.CAPTURE_METHODS`, in order),
        ``allow_dense`` (full-sequence mode: return a module even when no site can be
        rewritten, default False), ``parallel`` (cached mode: None, or "heads" for
        head-parallel execution over torch.distributed's default process group, each rank
        holding its heads' KV cache; every rank calls ``sparsify`` and the rollout alike;
        see `runtime.parallel`).

    The graph is specialised to the example inputs' shapes, dtype and device (batch size,
    frames per call, text length): capture with the inputs you will run. Ints stay runtime
    inputs, so one graph serves every chunk of a rollout.

    Raises TypeError/ValueError for bad arguments, ValueError naming `geometry` when it does
    not match the frames the model shows (its patch embedding's output grid, or its config's
    patch size), `CaptureError` when no capture path works and ValueError when the graph has
    no attention at all or no site can be rewritten (listing each site's reason; in
    full-sequence mode ``allow_dense=True`` accepts that).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a patterns.Pattern, got {type(pattern).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"options: unknown {unknown}; expected some of {OPTIONS}")
    mode = options.get("mode", "cached")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    debug = options.get("debug", False)
    if not isinstance(debug, bool):
        raise TypeError(f"debug: expected a bool, got {type(debug).__name__}")
    cuda_graphs = options.get("cuda_graphs", True)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs: expected a bool, got {type(cuda_graphs).__name__}")
    autotune = options.get("autotune", True)
    if not isinstance(autotune, bool):
        raise TypeError(f"autotune: expected a bool, got {type(autotune).__name__}")
    if "autotune" in options and mode != "cached":
        raise ValueError("autotune: an option of mode='cached' (the rollout's kernels)")
    allow_dense = options.get("allow_dense", False)
    if not isinstance(allow_dense, bool):
        raise TypeError(f"allow_dense: expected a bool, got {type(allow_dense).__name__}")
    if allow_dense and mode == "cached":
        raise ValueError("allow_dense: cached mode needs every self-attention on the KV cache")
    parallel = options.get("parallel")
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, got {parallel!r}")
    if parallel is not None and mode != "cached":
        raise ValueError(f"parallel: {parallel!r} needs mode='cached' (the paged KV cache)")
    args, kwargs = _split_inputs(example_inputs)
    if mode == "cached" and (kwargs or len(args) != 4):
        raise ValueError(
            "example_inputs: cached mode needs the chunk-form inputs as a 4-tuple "
            "(x, timestep, context, start_frame)"
        )
    geometry = _geometry(model, geometry, options)
    if mode == "cached":
        pattern.check_geometry(geometry)

    methods = tuple(options.get("capture_methods", CAPTURE_METHODS))
    # start_frame stays a runtime input: one graph serves every chunk of a rollout.
    captured = capture_inputs(model, args, kwargs, methods, (3,) if mode == "cached" else ())
    constants = {k: (input_name(model, k), v) for k, v in captured.constants.items()}
    graph_module = captured.graph_module
    sites = find_sites(graph_module)
    if not sites:
        raise ValueError(
            f"model: no attention found in the graph of {type(model).__name__} (captured by "
            f"{captured.method}); looked for {', '.join(FORMS)}"
        )
    grid = video_grid(model, graph_module, captured.args, captured.kwargs)
    check_geometry(grid, geometry, mode)
    verdicts = {s.index: classify(s, sites, graph_module) for s in sites if s.q is not None}
    reasons = _decide(sites, verdicts, graph_module, geometry, mode, grid)
    chosen = [s for s in sites if reasons[s.index] is None]

    if not chosen and not allow_dense:
        hint = "" if mode == "cached" else " (allow_dense=True accepts a module left dense)"
        raise ValueError(
            f"model: no self-attention site can be rewritten{hint}; reasons: "
            + "; ".join(f"site {s.index} ({s.module_path}): {reasons[s.index]}" for s in sites)
        )
    limit = model.config.max_frames if isinstance(model, CausalWanModel) else None
    attention, modules = _attention(
        chosen, mode, pattern, geometry, backend, debug, limit, parallel
    )
    device = _example_device(args, kwargs)
    if device is not None:
        # The new modules (block scorers included) start where the model runs: full-sequence
        # mode has no `reset` that would move them.
        attention.to(device)
    site_ids = {s.index: bind(m) for s, m in zip(chosen, modules, strict=True)}
    rewrite(graph_module, sites, site_ids)
    rows = _plan_rows(sites, verdicts, reasons, mode, geometry, _backend_label(backend, device))
    plan = Plan(
        rows, captured.method, mode, str(pattern), str(geometry), captured.failures,
        dict(constants.values()),
    )  # fmt: skip
    module = SparsifiedModule(graph_module, plan, attention, site_ids, constants)
    if mode == "cached":
        module.cuda_graphs = cuda_graphs
        attention.autotune = autotune
    return module


def _attention(
    chosen: list[AttentionSite], mode: str, pattern: Pattern, geometry: VideoGeometry,
    backend: str, debug: bool, max_frames: int | None, parallel: str | None,
) -> tuple[AttentionRuntime | nn.ModuleList, list[nn.Module]]:  # fmt: skip
    """The module owning the attention modules, and the module of each chosen site."""
    if mode == "cached":
        heads, kv_heads, head_dim = _heads(chosen[0])
        runtime_type = HeadParallelRuntime if parallel == "heads" else AttentionRuntime
        runtime = runtime_type(
            pattern, geometry, len(chosen), heads, kv_heads, head_dim, backend, debug, max_frames
        )
        return runtime, list(runtime.states)
    modules = [FullSequenceAttention(pattern, geometry, *_heads(s), backend) for s in chosen]
    return nn.ModuleList(modules), modules


def _plan_rows(
    sites: list[AttentionSite], verdicts: dict[int, Verdict], reasons: dict[int, str | None],
    mode: str, geometry: VideoGeometry, backend: str,
) -> list[PlanRow]:  # fmt: skip
    target = "AttentionState" if mode == "cached" else "FullSequenceAttention"
    chosen = [s.index for s in sites if reasons[s.index] is None]
    rows = []
    for s in sites:
        reason = reasons[s.index]
        rows.append(
            PlanRow(
                site=s.index,
                kind=verdicts[s.index].kind if s.index in verdicts else "?",
                layer=s.layer,
                module_path=s.module_path,
                form=s.form,
                op=s.op,
                layout=s.layout,
                q_shape=s.q_shape,
                k_shape=s.k_shape,
                v_shape=s.v_shape,
                decision=KEPT if reason else REWRITTEN,
                reason=reason or f"-> {target}[{chosen.index(s.index)}]",
                backend=None if reason else backend,
                q_block=None if reason else geometry.q_block,
                page_size=None if reason else geometry.page_size,
            )
        )
    return rows


def _example_device(args: tuple, kwargs: dict) -> torch.device | None:
    """Where the example inputs live: the first CUDA input's device if any is on CUDA, else
    the first tensor input's; None without tensor inputs."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    devices = [t.device for t in leaves if isinstance(t, Tensor)]
    return next((d for d in devices if d.type == "cuda"), devices[0] if devices else None)


def _backend_label(backend: str, device: torch.device | None) -> str:
    """The backend as the plan shows it: "auto" resolved from the example inputs' device."""
    if backend != "auto":
        return backend
    if device is not None and device.type == "cuda":
        return "auto (triton)"
    return "auto (torch)" if device is not None and device.type == "cpu" else "auto"
