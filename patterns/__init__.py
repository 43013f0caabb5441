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
]
