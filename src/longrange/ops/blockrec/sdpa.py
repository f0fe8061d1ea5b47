"""Shared-key/value attention on the fused ``scaled_dot_product_attention`` kernel.

Two layouts, chosen by batch size (the number of blocks run together):
- many rows: the H query heads are folded into the query axis ([B, 1, H*N, D]) against the
  single key/value head, so keys and values are never copied per head (nor saved per head
  for the backward pass);
- few rows: the key/value head is expanded to every query head. The CPU flash kernel's
  backward parallelises over batch x heads only, so folding a single block (B*H = 1) would
  leave cores idle and run several times slower. (``enable_gqa`` is slower than both.)
The causal band is cached per shape (in eager mode), so that the many calls of one forward
share one mask tensor (and autograd saves it once).

Kept kernel outputs (:func:`kept_kernel_contexts`, the ``context_fn`` of an eager CPU
activation checkpoint): inside its forward pass every CPU flash call records its output and
log-sum-exp; inside its recomputation the same calls, in the same order, take them instead of
running the kernel, and the backward pass runs the kernel's backward on them. This is what
selective checkpointing with a policy that saves the kernel's outputs does, without its
dispatch mode's Python hook on every operator of both passes.

Dimensions: B batch, H query heads, N queries, M keys, D head width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.blockrec.inputs import check_shared_kv_inputs
from longrange.ops.dense import additive_mask, cpu_flash_supported

FOLD_MIN_BATCH = 4


def _band(n: int, m: int, repeats: int, device: torch.device) -> Tensor:
    """[repeats * N, M] bool: row r*N + i (query i, at key position M - N + i) sees keys
    j <= M - N + i."""
    band = torch.arange(m, device=device)[None, :] <= torch.arange(n, device=device)[:, None] + (m - n)
    return band.repeat(repeats, 1) if repeats > 1 else band


def _bias(n: int, m: int, repeats: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The band as an additive mask (0 / -inf)."""
    return additive_mask(_band(n, m, repeats, device), dtype)


# Cached per shape in eager mode: the kernel turns a boolean mask into an additive one on every
# call and saves it for the backward pass; a cached one is built and saved once. A compiled
# graph builds them once per graph anyway (and cannot trace a cache).
causal_band = functools.lru_cache(maxsize=16)(_band)
causal_bias = functools.lru_cache(maxsize=16)(_bias)


class KeptKernels:
    """The (output, log-sum-exp) pairs of the flash calls of one checkpointed forward pass, in
    call order; ``replaying`` while its recomputation takes them back."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.replaying = False
        self.next = 0

    def take(self) -> tuple[Tensor, Tensor]:
        if self.next >= len(self.pairs):
            raise RuntimeError("a recomputation made more attention calls than its forward pass")
        pair = self.pairs[self.next]
        self.next += 1
        return pair


# The KeptKernels of the checkpointed pass running now (None outside one). A plain global, as
# modules.reversible's flag: eager only (a compiled graph uses selective checkpointing).
_ACTIVE: list[KeptKernels | None] = [None]


class _Kept:
    """Makes ``kept`` the active record (reusable: a second backward pass recomputes again)."""

    def __init__(self, kept: KeptKernels, replaying: bool) -> None:
        self.kept, self.replaying, self.previous = kept, replaying, None

    def __enter__(self) -> None:
        self.previous, _ACTIVE[0] = _ACTIVE[0], self.kept
        self.kept.replaying, self.kept.next = self.replaying, 0

    def __exit__(self, *exc) -> None:
        _ACTIVE[0] = self.previous


def kept_kernel_contexts():
    """The (forward, recomputation) context managers of one activation checkpoint whose CPU
    flash attention outputs are kept from its forward pass (module docstring)."""
    kept = KeptKernels()
    return _Kept(kept, False), _Kept(kept, True)


class _KeptFlash(torch.autograd.Function):
    """The CPU flash kernel with its output recorded (forward pass) or taken (recomputation)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale, kept: KeptKernels):
        if kept.replaying:
            out, lse = kept.take()
            out = out.detach()  # a fresh tensor object: a second recomputation takes it again
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=mask, scale=scale
            )
            kept.pairs.append((out.detach(), lse))
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    kept = _ACTIVE[0]
    if kept is None or torch.compiler.is_compiling() or not cpu_flash_supported(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None and mask.dtype == torch.bool:  # as the fused call turns it additive
        mask = additive_mask(mask, q.dtype)
    return _KeptFlash.apply(q, k, v, mask, scale, kept)


def shared_kv_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Same contract as :func:`shared_kv_attention_naive`: q [B, H, N, D], k/v [B, M, D],
    key_mask [B, M] -> [B, H, N, D]."""
    check_shared_kv_inputs(q, k, v, key_mask, causal, scale)
    b, h, n, d = q.shape
    m = k.shape[-2]
    fold = b >= FOLD_MIN_BATCH
    if fold:
        q_in, k_in, v_in = q.reshape(b, 1, h * n, d), k[:, None], v[:, None]
    else:
        q_in, k_in, v_in = q, k[:, None].expand(b, h, m, d), v[:, None].expand(b, h, m, d)
    causal = causal and n > 1
    repeats = h if fold else 1
    compiling = torch.compiler.is_compiling()
    band, bias = (_band, _bias) if compiling else (causal_band, causal_bias)
    mask = bias(n, m, repeats, q.device, q.dtype) if causal and key_mask is None else None
    empty_rows = None
    if key_mask is not None:
        mask = band(n, m, repeats, q.device) if causal else None
        keys = key_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
        any_key = mask.any(dim=-1, keepdim=True)
        # A row with no key would come back NaN: open it for the kernel, zero it after (in a
        # compiled graph always, which cannot branch on the data).
        if compiling or not bool(any_key.all()):
            empty_rows = ~any_key
            mask = mask | empty_rows
    out = _attend(q_in, k_in, v_in, mask, scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out.view(b, h, n, d)


def shared_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "sdpa",
) -> Tensor:
    """Shared-key/value attention; ``backend`` is "sdpa" (fused, default) or "naive"."""
    if backend == "sdpa":
        return shared_kv_attention_sdpa(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
    if backend == "naive":
        from longrange.ops.blockrec.naive import shared_kv_attention_naive

        return shared_kv_attention_naive(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
    raise ValueError(f"backend must be 'sdpa' or 'naive', got {backend!r}")
