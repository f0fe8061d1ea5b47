""":class:`ChunkedFeedForward`: :class:`~longrange.modules.feedforward.FeedForward` (same
weights, names and results) whose forward runs :func:`longrange.ops.mlp.mlp`, the MLP over
chunks of positions that keeps only its input for backward and recomputes the inner
activations there.

At long lengths the inner activations (twice the inner width per position, per layer) are
most of a model's activation memory; here they exist one chunk at a time. Short calls, whose
pre-activations take at most :data:`~longrange.ops.mlp.KEEP_PRE_BYTES`, keep those instead
and skip the second ``w1`` product. The plain path
runs where the chunked one does not apply: a gated (GLU) layer, dropout in training, or an
activation the op does not know.
"""

from __future__ import annotations

from torch import Tensor

from longrange.modules.feedforward import FeedForward, activation_name
from longrange.ops.mlp import mlp


class ChunkedFeedForward(FeedForward):
    """:class:`~longrange.modules.feedforward.FeedForward` on the chunked MLP op (module
    docstring); same constructor."""

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        name = activation_name(self.act)
        if name is None or self.glu or (self.training and self.dropout.p > 0):
            return super().forward(x)
        return mlp(x, self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias, activation=name)
