"""`find_sites`: every attention site of a captured graph, fused and unfused, in graph order."""

from __future__ import annotations

from torch.fx import GraphModule

from sparsify.sites.fused import find_fused
from sparsify.sites.records import AttentionSite
from sparsify.sites.unfused import find_unfused


def find_sites(module: GraphModule) -> list[AttentionSite]:
    """Every attention site of a captured graph, in graph order, numbered from 0."""
    order = {node: i for i, node in enumerate(module.graph.nodes)}
    sites = sorted([*find_fused(module), *find_unfused(module)], key=lambda s: order[s.anchor])
    for i, site in enumerate(sites):
        site.index = i
    return sites
