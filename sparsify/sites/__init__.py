"""Attention sites: every attention op of a captured graph as one normalised record.

* `fx` — reading nodes (example values, op names, arguments, module paths, in-place writes);
* `records` — `AttentionSite`, `Operand`, `Output` and `make_site`;
* `operands` — tracing q/k/v back to the tensors the model computed;
* `fused` — SDPA, flex_attention and flash-attn ops;
* `unfused` — softmax(q·kᵀ)·v matched on a networkx view of the graph;
* `find` — `find_sites`, which runs the finders.
"""

from sparsify.sites.find import find_sites
from sparsify.sites.records import AttentionSite

__all__ = ["AttentionSite", "find_sites"]
