"""Routed attention: queries and keys routed by online spherical k-means (Routing Transformer).

- :mod:`~longrange.ops.routing.kmeans`: the k-means maths (assignment, Lloyd step, data init,
  commitment loss, EMA);
- :mod:`~longrange.ops.routing.causal`: strictly causal routing (one cluster per token, the W
  most recent keys of one's cluster), blocked SDPA in (cluster, position) order, and its
  decoding step on per-cluster ring buffers;
- :mod:`~longrange.ops.routing.balanced`: the reference's balanced routing for non-causal use
  (each cluster takes its top-W queries and keys), and assigned routing (each query goes to its
  nearest cluster and meets the keys that cluster took) for cross attention in causal models;
- :mod:`~longrange.ops.routing.spans`: the CPU fast path of causal routing and of the
  family's local heads (causal or not): blocked attention over strided key spans, memory keys merged
  by log-sum-exp, a chunked lean backward;
- :mod:`~longrange.ops.routing.order`: the (cluster, position) order;
- :mod:`~longrange.ops.routing.naive`: the dense masked references of all three.
"""

from longrange.ops.routing.balanced import (
    assigned_routed_attention,
    assigned_routed_step,
    balanced_routed_attention,
    cluster_keys,
    cluster_topk,
)
from longrange.ops.routing.causal import (
    causal_routed_attention,
    causal_routed_step,
    push_ring,
    ring_buffers,
)
from longrange.ops.routing.naive import (
    assigned_routed_attention_naive,
    balanced_routed_attention_naive,
    causal_routed_attention_naive,
)
from longrange.ops.routing.order import sort_by_cluster
from longrange.ops.routing.spans import (
    causal_routed_attention_spans,
    local_attention_spans,
    span_attention,
)

__all__ = [
    "assigned_routed_attention",
    "assigned_routed_attention_naive",
    "assigned_routed_step",
    "balanced_routed_attention",
    "balanced_routed_attention_naive",
    "causal_routed_attention",
    "causal_routed_attention_naive",
    "causal_routed_attention_spans",
    "causal_routed_step",
    "cluster_keys",
    "cluster_topk",
    "local_attention_spans",
    "push_ring",
    "ring_buffers",
    "sort_by_cluster",
    "span_attention",
]
