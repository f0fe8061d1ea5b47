"""The plain maths of linear attention over feature maps: the explicit N x N kernel matrix.

A[t, i] = phi(q_t) . phi(k_i) * exp(c_i - c_t), where c is the keys' stabiliser (``log_scale``,
zero when absent); causal attention keeps i <= t. out_t = sum_i A[t, i] v_i / sum_i A[t, i]; a
row whose kernel sum is zero (every key masked) gives zeros.

Dimensions: B batch, H heads, N queries, L keys, M features, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_scale: Tensor | None = None
) -> Tensor:
    """q: [B, H, N, M], k: [B, H, L, M], v: [B, H, L, E], log_scale: [B, H, L] (causal
    needs L = N). Returns [B, H, N, E]."""
    if log_scale is not None and not causal:
        raise ValueError("log_scale is the causal running stabiliser; non-causal features carry none")
    kernel = q @ k.transpose(-1, -2)  # [B, H, N, L]
    n, length = kernel.shape[-2:]
    if causal:
        keep = torch.ones(n, length, dtype=torch.bool, device=q.device).tril()
        if log_scale is not None:
            diff = log_scale[..., None, :] - log_scale[..., :, None]
            kernel = kernel * torch.exp(diff.masked_fill(~keep, float("-inf")))
        kernel = kernel.masked_fill(~keep, 0.0)
    den = kernel.sum(-1, keepdim=True)
    out = (kernel @ v) / torch.where(den != 0, den, torch.ones_like(den))  # a signed kernel's sum may be < 0
    return out
