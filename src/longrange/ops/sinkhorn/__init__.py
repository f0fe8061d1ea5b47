"""Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention").

The sequence is cut into buckets; a sort net scores key buckets for each query bucket; the
scores become a reordering (a Gumbel-Sinkhorn soft permutation, or differentiable top-k
picks); each query bucket then attends to its own bucket plus the buckets sorted to it
(``n_top_buckets``), or every query to the first ``n_sortcut`` sorted buckets (SortCut).
The causal variant sorts from running means, so a bucket only draws on earlier buckets or on
learned null buckets, and shifts half of the heads by S - 1 so that bucket boundaries differ
between the halves.

- :mod:`balance`: Sinkhorn balancing with Gumbel noise, differentiable top-k;
- :mod:`sort`: the sort scores (bucket summaries, running means, causal candidates);
- :mod:`naive`: the reference, reordering as a dense buckets x buckets matrix;
- :mod:`bucketed`: gather + one batched SDPA call (the fast path; any device, masks);
- :mod:`picked`: causal attention chunk by chunk with a lean backward on the CPU flash
  kernels (what the causal path runs on the CPU without a padding mask);
- :mod:`layout`: one-pass head split / merge with the half-head shift, weighted bucket gather;
- :mod:`decode`: one causal decoding step against key / value caches.
"""

from longrange.ops.sinkhorn.balance import (
    dense_selection,
    differentiable_topk,
    gumbel_sinkhorn,
    sample_gumbel,
    sinkhorn_normalize,
)
from longrange.ops.sinkhorn.bucketed import (
    causal_bucket_mask,
    causal_sinkhorn_attention,
    gather_buckets,
    sinkhorn_attention,
)
from longrange.ops.sinkhorn.decode import causal_sinkhorn_step, picked_buckets
from longrange.ops.sinkhorn.layout import (
    gather_weighted,
    merge_heads,
    rotate_heads,
    split_heads,
    unrotate_heads,
)
from longrange.ops.sinkhorn.naive import causal_sinkhorn_attention_naive, sinkhorn_attention_naive
from longrange.ops.sinkhorn.sort import (
    attention_sort_scores,
    bucket_means,
    bucket_sums,
    causal_bucket_summaries,
    causal_candidates_valid,
    causal_query_summaries,
    causal_sort_scores,
    cumulative_mean,
    key_bucket_valid,
)

__all__ = [
    "attention_sort_scores",
    "bucket_means",
    "bucket_sums",
    "causal_bucket_mask",
    "causal_bucket_summaries",
    "causal_candidates_valid",
    "causal_query_summaries",
    "causal_sinkhorn_attention",
    "causal_sinkhorn_attention_naive",
    "causal_sinkhorn_step",
    "causal_sort_scores",
    "cumulative_mean",
    "dense_selection",
    "differentiable_topk",
    "gather_buckets",
    "gather_weighted",
    "gumbel_sinkhorn",
    "key_bucket_valid",
    "merge_heads",
    "picked_buckets",
    "rotate_heads",
    "sample_gumbel",
    "sinkhorn_attention",
    "sinkhorn_attention_naive",
    "sinkhorn_normalize",
    "split_heads",
    "unrotate_heads",
]
