"""The Routing Transformer's layers: local heads beside k-means routed heads, and the branch.

- :class:`SelfAttention` (the reference's name and keywords): local heads on
  :class:`~longrange.modules.local_attention.LocalAttention` plus routed heads
  (:class:`~longrange.models.routing.routed.KmeansAttention`) with rotary positions on their
  queries, keys and values (as the reference rotates them), or cross attention to a context.
- :class:`Branch`: one residual branch of a block (pre-norm, ScaleNorm or a ReZero gate
  starting at zero, then an optional token shift that honours the padding mask).

Decoding: with a ``cache`` (the dict a block stack's cached walk gives each branch) a branch
keeps its shifted inputs, and an attention layer its :class:`AttentionCache`: the local heads'
recent keys and values and the routed heads' cache. The first call with an empty cache runs
the whole prompt and fills it; later calls take one token per row.

Dimensions: B batch, H heads, N positions, D head width.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.checks import positive_int
from longrange.models.routing.routed import (
    ContextCache,
    KmeansAttention,
    RoutedCache,
    replaying,
)
from longrange.models.state import state_entry
from longrange.modules.local_attention import LocalAttention
from longrange.modules.norms import ScaleNorm
from longrange.modules.reversible import in_recomputation
from longrange.modules.rotary import RotaryEmbedding, rotate_half
from longrange.modules.shift import shift_tokens
from longrange.ops.routing.spans import local_attention_spans, span_attention_supported

# config name -> the activation class (the names RoutingConfig.ff_activation accepts)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


@state_entry
@dataclass
class AttentionCache:
    """Decoding state of one :class:`SelfAttention`: the local heads' recent (unrotated) keys
    and values and the routed heads' :class:`RoutedCache`."""

    position: int = 0
    local_k: Tensor | None = None
    local_v: Tensor | None = None
    routed: RoutedCache | ContextCache | None = None


class SelfAttention(nn.Module):
    """Local heads plus k-means routed heads (or cross attention to a context): x [B, N, dim]
    -> (out [B, N, dim], aux_loss).

    ``pos_emb``: absolute positions [N] (long) or the reference's sinusoid table [1, N,
    dim_head] (sines then cosines); the routed heads' queries, keys and values are rotated by
    it (interleaved pairs, as the reference does). ``conv_query_kernel`` is accepted for
    signature compatibility; the reference never used it, so only its default is allowed.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        max_seq_len: int,
        heads: int,
        local_attn_heads: int,
        window_size: int,
        dim_head: int | None = None,
        local_attn_window_size: int | None = None,
        local_attn_radius_blocks: int = 1,
        causal: bool = False,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        kmeans_ema_decay: float = 0.999,
        commitment_factor: float = 1e-4,
        receives_context: bool = False,
        context_window_size: int | None = None,
        rel_pos_emb: bool = True,
        num_mem_kv: int = 0,
        shared_qk: bool = False,
        conv_query_kernel: int = 9,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("max_seq_len", max_seq_len)):
            positive_int(name, value)
        positive_int("window_size", window_size)
        if dim_head is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when dim_head is None")
        if max_seq_len % window_size:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) must be divisible by window_size ({window_size}): "
                "it sets the number of clusters"
            )
        if not 0 <= local_attn_heads <= heads:
            raise ValueError(f"n_local_attn_heads must lie in [0, heads={heads}], got {local_attn_heads}")
        if receives_context and local_attn_heads:
            raise ValueError("local attention heads cannot attend to a context (receives_context=True)")
        if conv_query_kernel != 9:
            raise ValueError("conv_query_kernel is not used by the Routing Transformer; leave it at 9")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attn_layer_dropout must lie in [0, 1), got {dropout!r}")
        dim_head = dim // heads if dim_head is None else dim_head
        positive_int("dim_head", dim_head)
        self.heads, self.dim_head = heads, dim_head
        self.local_attn_heads = local_attn_heads
        self.global_attn_heads = heads - local_attn_heads
        self.causal, self.receives_context, self.shared_qk = causal, receives_context, shared_qk
        num_clusters = max_seq_len // window_size

        if self.local_attn_heads:
            local_window = window_size if local_attn_window_size is None else local_attn_window_size
            positive_int("local_attn_window_size", local_window)
            self.local_attn = LocalAttention(
                window_size=local_window,
                causal=causal,
                look_backward=local_attn_radius_blocks,
                look_forward=0 if causal else local_attn_radius_blocks,
                dropout=attn_dropout,
                rel_pos_emb_config=(dim_head, local_attn_heads) if rel_pos_emb else None,
                autopad=True,
            )
            self.local_to_qkv = nn.Linear(dim, 3 * dim_head * local_attn_heads)
        global_width = dim_head * self.global_attn_heads
        if self.global_attn_heads:
            self.global_attn = KmeansAttention(
                num_clusters,
                window_size,
                self.global_attn_heads,
                dim_head,
                causal=causal,
                dropout=attn_dropout,
                ema_decay=kmeans_ema_decay,
                commitment=commitment_factor,
                context_window_size=context_window_size,
                receives_context=receives_context,
                num_mem_kv=num_mem_kv,
                shared_qk=shared_qk,
            )
            self.rotary = RotaryEmbedding(dim_head, interleaved=True)
        self.to_q = nn.Linear(dim, global_width, bias=False)
        self.to_v = nn.Linear(dim, global_width, bias=False)
        if not shared_qk:
            self.to_k = nn.Linear(dim, global_width, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        return t.view(*t.shape[:2], -1, self.dim_head).transpose(1, 2)

    def _phases(self, pos_emb: Tensor) -> Tensor:
        """Unit complex numbers [N, D / 2] rotating each interleaved feature pair."""
        if pos_emb.is_floating_point():
            # the reference's table: [1, N, D] holding sin(angles) then cos(angles)
            sin, cos = pos_emb[0].float().chunk(2, dim=-1)
        else:
            angles = pos_emb.float()[:, None] * self.rotary.inv_freq[None, :]
            sin, cos = angles.sin(), angles.cos()
        return torch.complex(cos, sin)

    @staticmethod
    def _rotate(t: Tensor, phases: Tensor) -> Tensor:
        # (x1 + i x2) * (cos + i sin): the pair (x1, x2) turned by the angle, one complex product
        turned = torch.view_as_complex(t.float().unflatten(-1, (-1, 2))) * phases
        return torch.view_as_real(turned).flatten(-2).to(t.dtype)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        input_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        pos_emb: Tensor | None = None,
        *,
        cache: AttentionCache | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        if self.receives_context and context is None and not (cache is not None and cache.position > 0):
            raise ValueError("this attention layer has receives_context=True: pass context")
        b, n, _ = x.shape
        outs = []
        loss = x.new_zeros((), dtype=torch.float32)
        step = cache is not None and cache.position > 0
        if self.local_attn_heads:
            lq, lk, lv = (self._split(t) for t in self.local_to_qkv(x).chunk(3, dim=-1))
            outs.append(self._local(lq, lk, lv, input_mask, cache, step))
        if self.global_attn_heads and self.receives_context and step:
            # the context's keys and values were routed and cached at the first call
            out, _ = self.global_attn(self._split(self.to_q(x)), None, None, cache=cache.routed)
            outs.append(out)
        elif self.global_attn_heads:
            kv_input = context if self.receives_context else x
            q, v = self._split(self.to_q(x)), self._split(self.to_v(kv_input))
            if not self.shared_qk:
                k = self._split(self.to_k(kv_input))
            else:
                k = self._split(self.to_q(kv_input)) if self.receives_context else q
            if not self.receives_context and pos_emb is not None:
                phases = self._phases(pos_emb)
                rotated_q = self._rotate(q, phases)
                k = rotated_q if k is q else self._rotate(k, phases)
                q, v = rotated_q, self._rotate(v, phases)
            routed_cache = None
            if cache is not None:
                cache.routed = cache.routed or (ContextCache() if self.receives_context else RoutedCache())
                routed_cache = cache.routed
            out, aux = self.global_attn(
                q, k, v, query_mask=input_mask, key_mask=context_mask, cache=routed_cache
            )
            loss = loss + aux
            outs.append(out)
        if cache is not None:
            cache.position += n
        out = torch.cat(outs, dim=1).transpose(1, 2).reshape(b, n, -1)
        return self.dropout(self.to_out(out)), loss

    def _local_spans_apply(self, q: Tensor, mask: Tensor | None) -> bool:
        """Whether the local heads run on the span kernels (unmasked, CPU, no dropout)."""
        la = self.local_attn
        return (
            mask is None
            and (la.dropout == 0 or not self.training)
            and not (la.use_xpos or la.shared_qk or la.exact_windowsize or la.scale is not None)
            and la.backend == "auto"
            and (la.rel_pos is None or la.rel_pos.dim == q.shape[-1])
            and span_attention_supported(q)
        )

    def _local_spans(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Rotating at absolute positions gives the same scores as rotating inside each span
        # (only differences of positions matter), once the queries are moved to where the span
        # puts them: its last window, look_forward windows after their own. The angles are
        # reduced modulo 2 pi in float64 so that they stay exact at long positions.
        la = self.local_attn
        rot = la.rel_pos
        if rot is not None:
            ahead = la.look_forward * la.window_size
            positions = torch.arange(q.shape[2] + ahead, device=q.device, dtype=torch.float64)
            angles = torch.remainder(positions[:, None] * rot.inv_freq.double()[None, :], 2 * math.pi)
            angles = rot._expand(angles if q.dtype == torch.float64 else angles.float())
            cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
            n = q.shape[2]
            q = torch.addcmul(q * cos[ahead:], rotate_half(q), sin[ahead:])
            k = torch.addcmul(k * cos[:n], rotate_half(k), sin[:n])
        return local_attention_spans(
            q, k, v, window_size=la.window_size, causal=la.causal, look_backward=la.look_backward,
            look_forward=la.look_forward,
        )  # fmt: skip

    def _local(self, q, k, v, mask, cache: AttentionCache | None, step: bool) -> Tensor:
        if cache is None:
            if self._local_spans_apply(q, mask):
                return self._local_spans(q, k, v)
            return self.local_attn(q, k, v, input_mask=mask)
        keep = self.local_attn.cache_length
        if not step:
            out = self.local_attn(q, k, v, input_mask=mask)
            cache.local_k, cache.local_v = k[:, :, -keep:], v[:, :, -keep:]
            return out
        cache.local_k = torch.cat((cache.local_k, k), dim=2)[:, :, -keep:]
        cache.local_v = torch.cat((cache.local_v, v), dim=2)[:, :, -keep:]
        return self.local_attn.step(q, cache.local_k, cache.local_v, position=cache.position)


class Branch(nn.Module):
    """One residual branch: pre-norm (``norm`` "layer" or "scale") or, with ``norm=None``, a
    ReZero gate starting at zero; then an optional token shift that honours the padding mask;
    then ``fn``. ``attn``: ``fn`` is an attention layer (it takes the block's keywords and its
    own :class:`AttentionCache`); otherwise ``fn`` is a feed-forward that takes the padding
    mask as ``mask``. With a decoding ``cache`` (a dict) the shift continues from the inputs
    cached there. ``recompute`` (set per call by the model): in training keep only the input
    and run the branch again in backward, without its k-means updates the second time."""

    def __init__(
        self, dim: int, fn: nn.Module, *, norm: str | None, shifts: tuple[int, ...] | None, attn: bool
    ):
        super().__init__()
        self.norm = None if norm is None else (ScaleNorm(dim) if norm == "scale" else nn.LayerNorm(dim))
        self.residual_weight = nn.Parameter(torch.zeros(1)) if norm is None else None
        self.fn = fn
        self.shifts = shifts
        self.attn = attn
        self.recompute = False

    def forward(self, x: Tensor, *, input_mask: Tensor | None = None, cache: dict | None = None, **kwargs):
        if self.recompute and cache is None and torch.is_grad_enabled() and not in_recomputation():
            runs = [0]

            def run(x: Tensor, input_mask: Tensor | None, **kwargs):
                runs[0] += 1
                with replaying() if runs[0] > 1 else nullcontext():
                    return self._run(x, input_mask=input_mask, cache=None, **kwargs)

            return checkpoint(run, x, input_mask, use_reentrant=False, **kwargs)
        return self._run(x, input_mask=input_mask, cache=cache, **kwargs)

    def _run(self, x: Tensor, *, input_mask: Tensor | None, cache: dict | None, **kwargs):
        h = x if self.norm is None else self.norm(x)
        if self.shifts:
            past = None if cache is None else cache.get("shift")
            shifted = shift_tokens(h, self.shifts, input_mask, past=past)
            if cache is not None:
                keep = max(self.shifts)
                cache["shift"] = (h if past is None else torch.cat((past, h), dim=1))[:, -keep:]
            h = shifted
        if self.attn:
            attn_cache = None if cache is None else cache.setdefault("attn", AttentionCache())
            out = self.fn(h, input_mask=input_mask, cache=attn_cache, **kwargs)
        else:
            out = self.fn(h, input_mask=input_mask, mask=input_mask)
        if self.residual_weight is None:
            return out
        if isinstance(out, tuple):
            return (out[0] * self.residual_weight, *out[1:])
        return out * self.residual_weight
