from patterns.diagnostics import (
    attention_mass_recall,
    plot_block_mask,
    plot_recall_heatmap,
    topk_mask,
    topk_recall,
)
from patterns.scoring import (
    BlockScorer,
    block_attention_mass,
    iter_scorers,
    load_gates,
    pool_key_blocks,
    pool_pages,
    pool_query_blocks,
    query_block_rows,
    save_gates,
)
from patterns.training import capture_qk, train_gates

__all__ = [
    "BlockScorer",
    "block_attention_mass",
    "iter_scorers",
    "load_gates",
    "pool_key_blocks",
    "pool_pages",
    "pool_query_blocks",
    "query_block_rows",
    "save_gates",
    "attention_mass_recall",
    "capture_qk",
    "plot_block_mask",
    "plot_recall_heatmap",
    "topk_mask",
    "topk_recall",
    "train_gates",
]
