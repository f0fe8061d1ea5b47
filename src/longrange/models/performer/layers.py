"""Performer layers: multi-head FAVOR+ self / cross attention with optional local heads,
continuing from a decoding cache (running sums, local keys, a context's key sums), and the
chunked feed-forward whose training path never stores its hidden activations.

Names and keywords follow ``performer_pytorch`` (1.1.4); FAVOR+ itself is
:class:`~longrange.models.performer.fast_attention.FastAttention`.

Dimensions: B batch, N positions, L context positions, H heads, D head width, F hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from longrange.models.performer.fast_attention import FastAttention
from longrange.modules.feedforward import Chunk, FeedForward, lean_applies, lean_feed_forward
from longrange.modules.local_attention import LocalAttention
from longrange.modules.reversible import in_recomputation
from longrange.modules.rotary import rotate_interleaved


def apply_sinusoid_rotary(x: Tensor, pos_emb: Tensor) -> Tensor:
    """Rotate neighbouring feature pairs of x [B, H, N, D] by the angles of a sinusoid table
    pos_emb [1, N, D] laid out [sin(p f), cos(p f)] (the reference's ``layer_pos_emb``)."""
    sin, cos = pos_emb[0].to(x.dtype).chunk(2, dim=-1)  # [N, D / 2] each
    if x.dtype in (torch.float32, torch.float64):
        # pair (x0, x1) as x0 + i x1 times cos + i sin: one pass instead of five
        turned = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
        return torch.view_as_real(turned).flatten(-2)
    sin, cos = sin.repeat_interleave(2, dim=-1), cos.repeat_interleave(2, dim=-1)
    return x * cos + rotate_interleaved(x) * sin


class Attention(nn.Module):
    """Multi-head FAVOR+ attention with ``local_heads`` of windowed exact attention beside.

    forward(x [B, N, dim], pos_emb=None, context=None, mask=None, context_mask=None) ->
    [B, N, dim]; ``pos_emb`` is a sinusoid table [1, N, dim_head] that rotates the global
    heads' queries and keys (self-attention only); ``mask`` [B, N] and ``context_mask``
    [B, L] are key padding masks (True = keep).

    ``feature_redraw_interval`` redraws this layer's features every that many training calls
    when the layer is used on its own; a :class:`PerformerBody` owning it schedules redraws
    for all its layers instead (and sets the layer's interval to None).
    """

    def __init__(
        self,
        dim: int,
        causal: bool = False,
        heads: int = 8,
        dim_head: int = 64,
        local_heads: int = 0,
        local_window_size: int = 256,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        generalized_attention: bool = False,
        kernel_fn: str | Callable | None = None,
        dropout: float = 0.0,
        no_projection: bool = False,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
        **fast_kwargs,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not 0 <= local_heads <= heads:
            raise ValueError(f"local_heads must lie in [0, heads={heads}], got {local_heads}")
        dim_head = dim // heads if dim_head is None else dim_head
        inner = dim_head * heads
        self.heads = heads
        self.global_heads = heads - local_heads
        self.dim_head = dim_head
        self.causal = causal
        self.feature_redraw_interval = feature_redraw_interval
        self.calls_since_last_redraw = 0
        self.fast_attention = FastAttention(
            dim_head,
            nb_features,
            causal=causal,
            generalized_attention=generalized_attention,
            kernel_fn=kernel_fn,
            no_projection=no_projection,
            **fast_kwargs,
        )
        self.local_attn = None
        if local_heads:
            self.local_attn = LocalAttention(
                window_size=local_window_size,
                causal=causal,
                autopad=True,
                dropout=dropout,
                look_forward=int(not causal),
                rel_pos_emb_config=(dim_head, local_heads),
            )
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=attn_out_bias)
        self.dropout = nn.Dropout(dropout)

    def _maybe_redraw(self) -> None:
        interval = self.feature_redraw_interval
        if interval is None or not self.training or in_recomputation() or not torch.is_grad_enabled():
            return
        if self.calls_since_last_redraw >= interval:
            self.fast_attention.redraw_projection_matrix()
            self.calls_since_last_redraw = 0
        self.calls_since_last_redraw += 1

    def forward(
        self,
        x: Tensor,
        pos_emb: Tensor | None = None,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        cache: dict | None = None,
        position: int = 0,
        **_: object,
    ) -> Tensor:
        self._maybe_redraw()
        cross = context is not None
        if cross and self.global_heads < self.heads:
            raise ValueError("local attention heads cannot attend to a context (cross attention)")
        if not cross:
            context_mask = mask
        h, gh = self.heads, self.global_heads
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=h)  # noqa: E731
        q = split(self.to_q(x))
        outs = []
        if cross and cache is not None:
            if "context_kv" not in cache:
                source = context
                k, v = split(self.to_k(source)), split(self.to_v(source))
                cache["context_kv"] = self.fast_attention.context_sums(k, v, context_mask)
            outs.append(self.fast_attention.attend_sums(q, cache["context_kv"]))
        else:
            source = context if cross else x
            k, v = split(self.to_k(source)), split(self.to_v(source))
            if gh:
                qg, kg = q[:, :gh], k[:, :gh]
                if pos_emb is not None and not cross:
                    qg, kg = apply_sinusoid_rotary(qg, pos_emb), apply_sinusoid_rotary(kg, pos_emb)
                if cache is None:
                    outs.append(self.fast_attention(qg, kg, v[:, :gh], mask=context_mask))
                else:
                    out, cache["favor"] = self.fast_attention.forward_state(
                        qg, kg, v[:, :gh], mask=context_mask, state=cache.get("favor")
                    )
                    outs.append(out)
            if gh < h:
                outs.append(self._local(q[:, gh:], k[:, gh:], v[:, gh:], mask, cache, position))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))

    def _local(self, q: Tensor, k: Tensor, v: Tensor, mask, cache: dict | None, position: int) -> Tensor:
        local = self.local_attn
        if cache is None:
            return local(q, k, v, input_mask=mask)
        if mask is not None:
            raise ValueError("decoding with local heads takes no padding mask")
        keep = local.cache_length
        if "local_k" in cache:
            k_all = torch.cat((cache["local_k"], k), dim=-2)
            v_all = torch.cat((cache["local_v"], v), dim=-2)
        else:
            k_all, v_all = k, v
        if "local_k" not in cache and position == 0:
            out = local(q, k, v)  # a prefill from the start: one windowed pass
        else:
            rows = []
            for i in range(q.shape[-2]):
                end = k_all.shape[-2] - q.shape[-2] + i + 1
                lo = max(0, end - keep)
                rows.append(
                    local.step(
                        q[..., i : i + 1, :],
                        k_all[..., lo:end, :],
                        v_all[..., lo:end, :],
                        position=position + i,
                    )
                )
            out = torch.cat(rows, dim=-2)
        cache["local_k"], cache["local_v"] = k_all[..., -keep:, :], v_all[..., -keep:, :]
        return out


class SelfAttention(Attention):
    """:class:`Attention` that refuses a context."""

    def forward(self, *args, context: Tensor | None = None, **kwargs) -> Tensor:
        if context is not None:
            raise ValueError("self attention should not receive context")
        return super().forward(*args, **kwargs)


class CrossAttention(Attention):
    """:class:`Attention` over a context [B, L, dim] (a required keyword)."""

    def forward(self, *args, context: Tensor | None = None, **kwargs) -> Tensor:
        if context is None:
            raise ValueError("cross attention should receive context")
        return super().forward(*args, context=context, **kwargs)


class FeedForwardChunks(Chunk):
    """:class:`~longrange.modules.feedforward.Chunk` around a GELU :class:`FeedForward`
    (the reference's ``Chunk(ff_chunks, FeedForward(...), along_dim=1)``, same weights). In
    training it runs :func:`~longrange.modules.feedforward.lean_feed_forward`: with one chunk
    keeping the activations for backward, with more keeping only the input and forming the
    hidden activations again one slice at a time. Its branch hands it the pre-norm
    (``takes_norm``), so the normalised input is not kept either. With dropout or another
    activation it is the plain chunked layer."""

    takes_norm = True

    def __init__(self, chunks: int, fn: FeedForward) -> None:
        super().__init__(chunks, fn, along_dim=1)

    def forward(self, x: Tensor, norm: nn.Module | None = None, **kwargs) -> Tensor:
        if not lean_applies(self.fn, norm):
            return super().forward(x if norm is None else norm(x), **kwargs)
        return lean_feed_forward(self.fn, x, norm=norm, chunks=self.chunks, recompute=self.chunks > 1)
