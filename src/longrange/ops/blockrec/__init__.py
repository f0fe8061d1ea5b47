"""Attention of many query heads against one shared key/value head, as the block-recurrent
layers use it: queries of a block against [XL memory ; this block] (causal, aligned to the
last keys), tokens against states, states against states and states against a block."""

from longrange.ops.blockrec.naive import shared_kv_attention_naive
from longrange.ops.blockrec.sdpa import (
    kept_kernel_contexts,
    shared_kv_attention,
    shared_kv_attention_sdpa,
)

__all__ = [
    "kept_kernel_contexts",
    "shared_kv_attention",
    "shared_kv_attention_naive",
    "shared_kv_attention_sdpa",
]
