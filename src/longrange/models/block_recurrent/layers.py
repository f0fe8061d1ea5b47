"""The block-recurrent layer's weights and its feed-forward with a lean backward pass.

A layer: pre-norm attention branch (queries of ``heads`` heads, one shared key/value head,
optional qk-normalisation; its output projection also takes the reads of the recurrent
states it reads), a GEGLU feed-forward branch, and the state container when the layer is
recurrent (``memory/recurrent.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.memory.recurrent import QKNorm, StateContainer
from longrange.models.block_recurrent.config import BlockRecurrentConfig
from longrange.modules.feedforward import GEGLUFeedForward
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


class GatedFeedForward(torch.autograd.Function):
    """``w2 (gelu(a) * b)`` with ``[a ; b] = w1 x``, saving only x and ``w1 x`` for the backward
    pass, where the gated activation is recomputed (autograd would also keep gelu(a) and the
    product: 40% more feed-forward activation memory, the largest share of the model's)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        h = F.linear(x, w1)
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(a) * b, w2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, h, w1, w2 = ctx.saved_tensors
        dt = h.dtype  # the compute dtype of the forward (lower under autocast)
        a, b = h.chunk(2, dim=-1)
        grad = grad.to(dt)
        # In-place steps keep the temporaries few: this runs while every activation is saved.
        cdf = torch.erf(a * 0.5**0.5).mul_(0.5).add_(0.5)
        gated = torch.mul(a, cdf).mul_(b)
        grad_w2 = grad.flatten(0, -2).T @ gated.flatten(0, -2)
        del gated
        grad_gated = grad @ w2.to(dt)
        if torch.compiler.is_compiling():
            # The compiler fuses these; it refuses the strided out= writes below.
            slope = torch.exp(a * a * -0.5) * (2 * math.pi) ** -0.5 * a + cdf
            grad_h = torch.cat((slope * b * grad_gated, a * cdf * grad_gated), dim=-1)
        else:
            grad_h = torch.empty_like(h)
            grad_a, grad_b = grad_h.chunk(2, dim=-1)
            torch.mul(a, cdf, out=grad_b)
            grad_b.mul_(grad_gated)
            slope = torch.mul(a, a).mul_(-0.5).exp_().mul_((2 * math.pi) ** -0.5).mul_(a).add_(cdf)
            del cdf
            torch.mul(slope, b, out=grad_a)
            grad_a.mul_(grad_gated)
        del slope, grad_gated
        grad_w1 = grad_h.flatten(0, -2).T @ x.to(dt).flatten(0, -2)
        grad_x = grad_h @ w1.to(dt)
        return grad_x.to(x.dtype), grad_w1.to(w1.dtype), grad_w2.to(w2.dtype)


def feed_forward(ff: GEGLUFeedForward, x: Tensor) -> Tensor:
    """``ff(x)`` (exact GELU, no biases, no dropout) with the lean backward above."""
    return GatedFeedForward.apply(x, ff.w1.weight, ff.w2.weight)
