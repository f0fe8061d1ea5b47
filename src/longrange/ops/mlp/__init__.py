"""The position-wise two-layer MLP (``w2(act(w1(x) + b1)) + b2``) as a function.

- :mod:`~longrange.ops.mlp.naive`: the plain composition of ``F.linear`` and the activation
  (autograd keeps the inner activations, 2 x the inner width per position);
- :mod:`~longrange.ops.mlp.chunked`: the same maths over slices of positions in one autograd
  function (:func:`~longrange.ops.mlp.chunked.sliced_mlp`; also with a LayerNorm in front
  and a gated unit, the lean feed-forward of ``modules/feedforward.py``) that keeps less for
  backward. :func:`mlp_chunked` keeps only the input and recomputes each slice's inner
  activations there: they exist one slice at a time (a few megabytes that the allocator
  reuses), so memory per position is the input's width instead of twice the inner width,
  for one more ``w1`` product in backward. Under autocast its products run in autocast's
  dtype.

:func:`mlp` picks: ``chunked`` for the activations it knows (:data:`CHUNKED_ACTIVATIONS`),
``naive`` otherwise. Recomputing costs one more ``w1`` product in backward (about 8% of a
training step at the reference defaults of routing and sinkhorn, 8K positions), which only
pays where the inner activations are large, so ``chunked`` keeps the pre-activations (the
inner width per position; backward forms the activation again from them) while they take at
most :data:`KEEP_PRE_BYTES`, and only the input beyond.

Dimensions: N positions (all leading dimensions), D input width, F inner width, O output width.
"""

from __future__ import annotations

import math

from torch import Tensor

from longrange.ops.mlp.chunked import CHUNKED_ACTIVATIONS, mlp_chunked
from longrange.ops.mlp.naive import mlp_naive

BACKENDS = ("auto", "chunked", "naive")
# the most bytes of pre-activations the chunked backend keeps for backward per call (module
# docstring): those of 8K positions at an inner width of 1024 in float32
KEEP_PRE_BYTES = 32 << 20

__all__ = ["BACKENDS", "CHUNKED_ACTIVATIONS", "KEEP_PRE_BYTES", "mlp", "mlp_chunked", "mlp_naive"]


def mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str,
    backend: str = "auto",
) -> Tensor:
    """x [..., D], w1 [F, D], b1 [F], w2 [O, F], b2 [O] -> [..., O]; ``activation`` one of
    :data:`CHUNKED_ACTIVATIONS` (any name works with ``naive``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "naive" or (backend == "auto" and activation not in CHUNKED_ACTIVATIONS):
        return mlp_naive(x, w1, b1, w2, b2, activation=activation)
    pre_bytes = math.prod(x.shape[:-1]) * w1.shape[0] * x.element_size()
    keep = "pre" if pre_bytes <= KEEP_PRE_BYTES else "input"
    return mlp_chunked(x, w1, b1, w2, b2, activation=activation, keep=keep)
