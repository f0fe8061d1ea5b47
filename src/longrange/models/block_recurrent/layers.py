"""The block-recurrent layer's weights and its feed-forward with a lean backward pass.

A layer: pre-norm attention branch (queries of ``heads`` heads, one shared key/value head,
optional qk-normalisation; its output projection also takes the reads of the recurrent
states it reads), a GEGLU feed-forward branch, and the state container when the layer is
recurrent (``memory/recurrent.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longrange.memory.recurrent import QKNorm, StateContainer
from longrange.models.block_recurrent.config import BlockRecurrentConfig
from longrange.modules.feedforward import GEGLUFeedForward, lean_applies, lean_feed_forward
from longrange.modules.norms import LayerNorm
from longrange.modules.rotary import rotate_half


class BlockRecurrentLayer(nn.Module):
    """One layer's weights: attention branch (+ state reads), feed-forward branch, and the
    state container when the layer is recurrent."""

    def __init__(self, config: BlockRecurrentConfig, *, qk_rmsnorm: bool, reads: int, recurrent: bool):
        super().__init__()
        c = config
        inner = c.heads * c.dim_head
        self.heads = c.heads
        self.norm = LayerNorm(c.dim, bias=False)
        self.to_q = nn.Linear(c.dim, inner, bias=False)
        self.to_kv = nn.Linear(c.dim, 2 * c.dim_head, bias=False)
        self.qk_norm = QKNorm(c.dim_head) if qk_rmsnorm else None
        self.scale = c.qk_rmsnorm_scale if qk_rmsnorm else None
        self.to_out = nn.Linear(inner * (1 + reads), c.dim, bias=False)
        self.state_container = None
        if recurrent:
            self.state_container = StateContainer(
                c.dim,
                num_state_vectors=c.state_vectors(),
                dim_head=c.dim_head,
                heads=c.heads,
                qk_rmsnorm=qk_rmsnorm,
                qk_rmsnorm_scale=c.qk_rmsnorm_scale,
                gate_type=c.gate_type,
                backend=c.attn_backend,
            )
        self.ff_norm = LayerNorm(c.dim, bias=False)
        self.ff = GEGLUFeedForward(c.dim, mult=c.ff_mult, bias=False)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def join(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat that skips the copy of a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def feed_forward(ff: GEGLUFeedForward, x: Tensor) -> Tensor:
    """``ff(x)``; in training through the lean layer keeping x and ``w1 x`` for backward, which
    forms ``gelu(a) * b`` again (autograd would also keep gelu(a) and the product: 40% more
    feed-forward activation memory, the largest share of the model's). Slices of the rows
    keep the elementwise passes in cache: 8K tokens' forward + backward 149 -> 118 ms against
    the whole-length autograd function this replaced."""
    if lean_applies(ff):
        return lean_feed_forward(ff, x, keep="pre")
    return ff(x)
