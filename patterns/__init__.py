"""What to attend: video geometry, the pattern library, block scoring, block tables and the
symbolic KV-cache footprint. Imports torch and sympy only (never codegen); triton is imported
only on the CUDA selection path, by ``patterns.select_kernel``."""

from patterns.bidirectional_table import full_sequence_table
from patterns.block_table import BlockTable
from patterns.cache_policy import CachePolicy
from patterns.cache_view import CacheView
from patterns.chunk_layout import ChunkLayout
from patterns.diagnostics import (
    attention_mass_recall,
    plot_block_mask,
    plot_recall_heatmap,
    topk_recall,
)
from patterns.footprint import Footprint
from patterns.geometry import VideoGeometry
from patterns.library import Dense, Pattern, PersistentLocal, SinkWindow, TopK
from patterns.scorer_weights import load_scorers, save_scorers
from patterns.scoring import (
    BlockScorer,
    block_attention_mass,
    iter_scorers,
    pool_key_blocks,
    pool_pages,
    pool_query_blocks,
    query_block_rows,
)
from patterns.selection import topk_mask
from patterns.training import capture_qk, recall_table, scorer_recall, train_scorers

__all__ = [
    "BlockScorer",
    "BlockTable",
    "CachePolicy",
    "CacheView",
    "ChunkLayout",
    "Dense",
    "Footprint",
    "Pattern",
    "PersistentLocal",
    "SinkWindow",
    "TopK",
    "VideoGeometry",
    "block_attention_mass",
    "full_sequence_table",
    "iter_scorers",
    "load_scorers",
    "pool_key_blocks",
    "pool_pages",
    "pool_query_blocks",
    "query_block_rows",
    "save_scorers",
    "attention_mass_recall",
    "capture_qk",
    "plot_block_mask",
    "plot_recall_heatmap",
    "topk_mask",
    "topk_recall",
    "recall_table",
    "scorer_recall",
    "train_scorers",
]
