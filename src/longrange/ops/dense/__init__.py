"""Exact softmax attention with boolean masks, causal offsets and additive biases."""

from longrange.ops.dense.naive import dense_attention_naive
from longrange.ops.dense.sdpa import (
    causal_mask,
    dense_attention,
    dense_attention_sdpa,
    merge_masks,
)

__all__ = ["causal_mask", "dense_attention", "dense_attention_naive", "dense_attention_sdpa", "merge_masks"]
