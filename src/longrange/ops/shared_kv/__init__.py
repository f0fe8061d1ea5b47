"""Attention of H query heads against one shared key/value head (the Memorizing
Transformer's layers) with an additive relative-position bias and, optionally, extra logits
per query in the same softmax (the pairs a kNN memory retrieved).

Backends (one choice point, :func:`shared_kv_attention`):
- ``naive``: the full score matrix [B, H, N, M], the reference;
- ``blocked``: blocks of query positions as rows of GEMMs, skipping the keys a causal bias
  hides (``blocked.py``); it needs the bias as a :class:`ToeplitzBias` with one row of
  values per head;
- ``auto``: ``blocked`` on the CPU where it applies, for at least :data:`BLOCKED_FROM`
  queries, and not under ``torch.compile`` (which fuses the naive form's passes itself), else
  ``naive``. On a GPU the blocked form's many small kernels have not been measured against
  the naive form's few large ones, so GPUs keep the naive form (what the layers ran before).

Dimensions: B batch, H heads, N queries (the last N of M positions), M keys, D head width,
K extra logits per query.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.checks import floating_tensors, one_dtype
from longrange.ops.dense.bias import ToeplitzBias
from longrange.ops.shared_kv.blocked import shared_kv_attention_blocked
from longrange.ops.shared_kv.diagonal import diagonal_sums, diagonal_sums_torch
from longrange.ops.shared_kv.naive import shared_kv_attention_naive

BACKENDS = ("auto", "blocked", "naive")
# fewer queries take the naive form under "auto": decoding one token at a time, the blocked
# form's set-up cost more than it saves (memorizing at the bench size, 4 layers: 375 against
# 417 tokens/s); a chunk of 512 queries gains (82.0 against 89.9 ms a training chunk)
BLOCKED_FROM = 16


def _check(
    q: Tensor, keys: Tensor, values: Tensor, bias, memory_logits: Tensor | None, key_mask: Tensor | None
) -> None:
    floating_tensors(q=q, keys=keys, values=values)
    one_dtype(q=q, keys=keys, values=values, autocast_casts=True)  # under autocast the products cast them
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got {list(q.shape)}")
    b, h, n, d = q.shape
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != d:
            raise ValueError(f"{name} must be [B={b}, M, D={d}], got {list(t.shape)}")
    if keys.shape[1] != values.shape[1]:
        raise ValueError(f"keys and values must have the same M, got {keys.shape[1]} and {values.shape[1]}")
    m = keys.shape[1]
    shape = (bias.heads, bias.n, bias.m) if isinstance(bias, ToeplitzBias) else tuple(bias.shape)
    if len(shape) != 3 or shape[0] not in (1, h) or shape[1:] != (n, m):
        raise ValueError(f"bias must be [H={h} or 1, N={n}, M={m}], got {list(shape)}")
    if memory_logits is not None:
        floating_tensors(memory_logits=memory_logits)
    if memory_logits is not None and (
        memory_logits.dim() != 4 or tuple(memory_logits.shape[:3]) != (b, h, n)
    ):
        raise ValueError(f"memory_logits must be [B={b}, H={h}, N={n}, K], got {list(memory_logits.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, m)):
        raise ValueError(
            f"key_mask must be a bool tensor [B={b}, M={m}], got {key_mask.dtype} {list(key_mask.shape)}"
        )


def shared_kv_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: ToeplitzBias | Tensor,
    *,
    scale: float = 1.0,
    memory_logits: Tensor | None = None,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention with scores ``scale * q . key + bias``: q [B, H, N, D], keys /
    values [B, M, D], bias [H or 1, N, M] (a tensor, or a :class:`ToeplitzBias`),
    memory_logits [B, H, N, K] | None (joined to each query's scores before the softmax),
    key_mask [B, M] bool | None (True: a real key; a hidden key scores the most negative
    finite number), dropout (the attention dropout rate in [0, 1), applied to the weights
    after the softmax, memory logits' included) -> out [B, N, H, D] and the weights of the
    memory logits [B, N, H, K] (after dropout; None without them). ``backend``: one of
    :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    _check(q, keys, values, bias, memory_logits, key_mask)
    blocked_fits = isinstance(bias, ToeplitzBias) and bias.heads == q.shape[1]
    if backend == "blocked" and not blocked_fits:
        raise ValueError("backend='blocked' needs the bias as a ToeplitzBias with one row of values per head")
    pays = q.device.type == "cpu" and q.shape[2] >= BLOCKED_FROM and not torch.compiler.is_compiling()
    if backend == "naive" or (backend == "auto" and not (blocked_fits and pays)):
        return shared_kv_attention_naive(
            q,
            keys,
            values,
            bias,
            scale=scale,
            memory_logits=memory_logits,
            key_mask=key_mask,
            dropout=dropout,
        )
    return shared_kv_attention_blocked(
        q,
        keys,
        values,
        bias.values,
        bias.rows(),
        scale=scale,
        causal=bias.causal,
        memory_logits=memory_logits,
        key_mask=key_mask,
        dropout=dropout,
    )


__all__ = [
    "BACKENDS",
    "BLOCKED_FROM",
    "ToeplitzBias",
    "diagonal_sums",
    "diagonal_sums_torch",
    "shared_kv_attention",
    "shared_kv_attention_blocked",
    "shared_kv_attention_naive",
]
