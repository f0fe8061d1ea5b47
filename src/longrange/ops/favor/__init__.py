"""FAVOR+: linear attention through positive orthogonal random features (Performer).

- ``features``: projection matrices and the feature maps (softmax kernel with its stabiliser,
  generalized kernel, no projection);
- ``naive``: the explicit N x N kernel matrix, the reference;
- ``linear``: non-causal linear attention;
- ``chunk``: causal linear attention in chunks with running sums, and the decoding step;
- ``fused``: causal FAVOR+ with the softmax kernel formed inside the chunked products (and
  formed again in backward), so the feature tensors are never stored; and its decoding step;
- ``fused_noncausal``: non-causal FAVOR+ with the softmax kernel in one autograd function.

:func:`causal_linear_attention` is the one choice point between the chunked and naive paths
over given features; FAVOR+ layers call :func:`softmax_causal_attention` and
:func:`softmax_noncausal_attention` for the softmax kernel.
"""

from __future__ import annotations

from torch import Tensor

from longrange.ops.favor.chunk import FavorState, causal_linear_attention_step, chunk_causal_linear_attention
from longrange.ops.favor.features import (
    EMPTY_LOG_SCALE,
    gaussian_orthogonal_random_matrix,
    generalized_features,
    no_projection_features,
    running_log_scale,
    softmax_key_features,
    softmax_query_features,
)
from longrange.ops.favor.fused import CHUNK_SIZE, softmax_causal_attention, softmax_causal_step
from longrange.ops.favor.fused_noncausal import softmax_noncausal_attention
from longrange.ops.favor.linear import key_value_sums, linear_attention
from longrange.ops.favor.naive import linear_attention_naive

BACKENDS = ("auto", "fused", "chunk", "naive")

__all__ = [
    "BACKENDS",
    "CHUNK_SIZE",
    "EMPTY_LOG_SCALE",
    "FavorState",
    "causal_linear_attention",
    "causal_linear_attention_step",
    "chunk_causal_linear_attention",
    "gaussian_orthogonal_random_matrix",
    "generalized_features",
    "key_value_sums",
    "linear_attention",
    "linear_attention_naive",
    "no_projection_features",
    "running_log_scale",
    "softmax_causal_attention",
    "softmax_causal_step",
    "softmax_key_features",
    "softmax_noncausal_attention",
    "softmax_query_features",
]


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_scale: Tensor | None = None,
    chunk_size: int = 128,
    state: FavorState | None = None,
    backend: str = "auto",
) -> tuple[Tensor, FavorState | None]:
    """Causal linear attention over features q, k [B, H, N, M] and values v [B, H, N, E].

    ``backend``: "chunk" (and "auto"; "fused" applies to the softmax kernel only, see
    :func:`softmax_causal_attention`) runs :func:`chunk_causal_linear_attention`; "naive" the
    explicit kernel matrix (no state in or out). Returns (out [B, H, N, E], state or None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "naive":
        if state is not None:
            raise ValueError("the naive backend cannot continue from a state; use backend='chunk'")
        return linear_attention_naive(q, k, v, causal=True, log_scale=log_scale), None
    return chunk_causal_linear_attention(q, k, v, log_scale=log_scale, chunk_size=chunk_size, state=state)
