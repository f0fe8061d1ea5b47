"""Performer layers: FAVOR+ attention (``FastAttention``), multi-head self / cross attention with
optional local heads, and the residual branch that carries pre-norm, ReZero and token shift.

Names and keywords follow ``performer_pytorch`` (1.1.4); the math lives in
:mod:`longrange.ops.favor`. Where these layers differ from the reference, it is on purpose:
- padding masks remove masked keys from the numerator and the normaliser (the reference only
  zeroed their values, so they still counted in the normaliser);
- causal attention is strictly causal: no feature epsilon and a running key stabiliser instead
  of the reference's sequence-wide max (see :mod:`longrange.ops.favor.features`); it runs in
  chunks of ``chunk_size`` positions with O(N (M + E) + N C) memory, in any float dtype;
- every layer can continue from a decoding cache (running sums, local keys, shifted inputs).

Dimensions: B batch, N positions, L context positions, H heads, D head width, M features.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.modules.feedforward import Chunk, FeedForward
from longrange.modules.local_attention import LocalAttention
from longrange.modules.norms import ScaleNorm
from longrange.modules.reversible import in_recomputation
from longrange.modules.rotary import rotate_interleaved
from longrange.modules.shift import shift_tokens
from longrange.ops import favor

KERNEL_FNS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}


def resolve_kernel_fn(kernel_fn: str | Callable | None) -> tuple[str, Callable]:
    """A kernel function given by name, as a module or as any callable -> (config name, fn).

    Modules equal to a named default (``nn.ReLU()``) get that name; anything else is "custom"
    and must be passed to the model again when it is loaded.
    """
    if kernel_fn is None:
        return "relu", nn.ReLU()
    if isinstance(kernel_fn, str):
        if kernel_fn not in KERNEL_FNS:
            raise ValueError(
                f"kernel_fn must be one of {sorted(KERNEL_FNS)} or a callable, got {kernel_fn!r}"
            )
        return kernel_fn, KERNEL_FNS[kernel_fn]()
    if isinstance(kernel_fn, type) and issubclass(kernel_fn, nn.Module):
        kernel_fn = kernel_fn()
    if not callable(kernel_fn):
        raise TypeError(f"kernel_fn must be a name, an nn.Module or a callable, got {kernel_fn!r}")
    for name, make in KERNEL_FNS.items():
        if type(kernel_fn) is make and repr(kernel_fn) == repr(make()):
            return name, kernel_fn
    return "custom", kernel_fn


def default_nb_features(dim_head: int) -> int:
    """The paper's choice M = D log D (the reference's default)."""
    return int(dim_head * math.log(dim_head))


class FastAttention(nn.Module):
    """FAVOR+ over q, k, v: [B, H, N, D] (keys and values may have their own length L).

    ``ortho_scaling`` 0 draws chi-distributed row norms, 1 fixes them at sqrt(D);
    ``generalized_attention`` uses kernel_fn(x W^T) + ``kernel_eps`` features;
    ``no_projection`` uses softmax-ed queries and keys without random features.
    Non-causal softmax features carry the reference's epsilon ``feature_eps`` (1e-4); causal
    ones none. ``chunk_size`` and ``backend`` ("auto", "fused", "chunk", "naive") pick the
    causal op ("auto": fused for the softmax kernel, chunked for the others).
    The projection matrix is a buffer, so it is saved and loaded with the weights.
    """

    def __init__(
        self,
        dim_heads: int,
        nb_features: int | None = None,
        ortho_scaling: int = 0,
        causal: bool = False,
        generalized_attention: bool = False,
        kernel_fn: str | Callable | None = None,
        no_projection: bool = False,
        *,
        chunk_size: int = 128,
        backend: str = "auto",
        feature_eps: float = 1e-4,
        kernel_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(dim_heads, bool) or not isinstance(dim_heads, int) or dim_heads < 1:
            raise ValueError(f"dim_heads must be a positive int, got {dim_heads!r}")
        if no_projection and generalized_attention:
            raise ValueError(
                "no_projection and generalized_attention exclude each other: no_projection "
                "softmaxes queries and keys, generalized_attention applies kernel_fn to projections"
            )
        if no_projection and nb_features is not None:
            raise ValueError("nb_features has no effect with no_projection=True (there are no features)")
        if kernel_fn is not None and not generalized_attention and not isinstance(kernel_fn, nn.ReLU):
            raise ValueError("kernel_fn is used only with generalized_attention=True")
        if ortho_scaling not in (0, 1):
            raise ValueError(f"ortho_scaling must be 0 or 1, got {ortho_scaling!r}")
        if backend not in favor.BACKENDS:
            raise ValueError(f"backend must be one of {favor.BACKENDS}, got {backend!r}")
        if backend == "fused" and (no_projection or generalized_attention):
            raise ValueError("backend='fused' is the softmax kernel's; use 'auto' or 'chunk'")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        nb_features = default_nb_features(dim_heads) if nb_features is None else nb_features
        if isinstance(nb_features, bool) or not isinstance(nb_features, int) or nb_features < 1:
            raise ValueError(f"nb_features must be a positive int, got {nb_features!r}")
        self.dim_heads = dim_heads
        self.nb_features = nb_features
        self.ortho_scaling = ortho_scaling
        self.causal = causal
        self.generalized_attention = generalized_attention
        self.kernel_fn = resolve_kernel_fn(kernel_fn)[1]
        self.no_projection = no_projection
        self.chunk_size = chunk_size
        self.backend = backend
        self.feature_eps = feature_eps
        self.kernel_eps = kernel_eps
        self.register_buffer("projection_matrix", self.create_projection())

    def create_projection(self, device=None, generator: torch.Generator | None = None) -> Tensor:
        return favor.gaussian_orthogonal_random_matrix(
            self.nb_features, self.dim_heads, self.ortho_scaling, generator=generator, device=device
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, device=None, generator: torch.Generator | None = None) -> None:
        """Draw a new projection matrix in place (on the buffer's device unless given)."""
        fresh = self.create_projection(generator=generator)
        self.projection_matrix.copy_(fresh.to(device or self.projection_matrix.device))

    def features(
        self, q: Tensor, k: Tensor, mask: Tensor | None, running: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(phi(q), phi(k), the keys' running stabiliser or None); see ops.favor.features."""
        if self.no_projection:
            return favor.no_projection_features(
                q, k, causal=self.causal, mask=mask, initial_log_scale=running
            )
        proj = self.projection_matrix
        if self.generalized_attention:
            make = dict(kernel_fn=self.kernel_fn, eps=self.kernel_eps)
            return (
                favor.generalized_features(q, proj, **make),
                favor.generalized_features(k, proj, mask=mask, **make),
                None,
            )
        eps = 0.0 if self.causal else self.feature_eps
        fq = favor.softmax_query_features(q, proj, eps=eps)
        fk, scale = favor.softmax_key_features(
            k, proj, causal=self.causal, mask=mask, eps=eps, initial_log_scale=running
        )
        return fq, fk, scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q: [B, H, N, D], k, v: [B, H, L, D]; mask: [B, L] key padding (True = keep)."""
        return self.forward_state(q, k, v, mask=mask)[0]

    def forward_state(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, state=None
    ) -> tuple[Tensor, favor.FavorState | None]:
        """Like forward; causal attention also continues from / returns its running sums."""
        if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != self.dim_heads or k.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"q, k, v must be [B, H, N, {self.dim_heads}], got {list(q.shape)}, {list(k.shape)}"
            )
        if not self.causal:
            if state is not None:
                raise ValueError("only causal attention continues from a state")
            fq, fk, _ = self.features(q, k, mask)
            return favor.linear_attention(fq, fk, v).to(v.dtype), None
        if k.shape[-2] != q.shape[-2]:
            raise ValueError("causal attention needs as many keys as queries")
        softmax_kernel = not (self.no_projection or self.generalized_attention)
        one_step = state is not None and q.shape[-2] == 1 and not torch.is_grad_enabled()
        if softmax_kernel and self.backend in ("auto", "fused") and not one_step:
            return favor.softmax_causal_attention(
                q, k, v, self.projection_matrix, mask=mask, chunk_size=self.chunk_size, state=state
            )
        running = None if state is None else state.log_scale
        fq, fk, scale = self.features(q, k, mask, running)
        if one_step:
            # decoding: update the running sums directly (the same maths as a chunk of one)
            return favor.causal_linear_attention_step(fq, fk, v, state, log_scale=scale)
        if state is None and self.backend == "naive":
            return favor.linear_attention_naive(fq, fk, v.float(), causal=True, log_scale=scale).to(
                v.dtype
            ), None
        return favor.chunk_causal_linear_attention(
            fq, fk, v, log_scale=scale, chunk_size=self.chunk_size, state=state
        )

    def context_sums(self, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Non-causal key sums [B, H, M, D + 1] of a fixed context, for cached cross attention."""
        _, fk, _ = self.features(k, k, mask)
        return favor.key_value_sums(fk, v.to(fk.dtype))

    def attend_sums(self, q: Tensor, kv: Tensor) -> Tensor:
        """Queries [B, H, N, D] against :meth:`context_sums`."""
        fq, _, _ = self.features(q, q[..., :1, :], None)
        return favor.linear_attention(fq, None, None, kv=kv).to(q.dtype)

    def extra_repr(self) -> str:
        kind = (
            "no_projection"
            if self.no_projection
            else "generalized"
            if self.generalized_attention
            else "softmax"
        )
        return (
            f"dim_heads={self.dim_heads}, nb_features={self.nb_features}, causal={self.causal}, kernel={kind}"
        )


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


class _LeanFeedForward(torch.autograd.Function):
    """w2(gelu(w1 x + b1)) + b2 (gated: w2(gelu(a) * g) + b2 with [a, g] = w1 x + b1), computed
    over ``chunks`` slices of the positions and keeping only x for backward, which forms the
    hidden activations again one slice at a time: the [B, N, F] activations are never stored."""

    @staticmethod
    def _hidden(x: Tensor, w1: Tensor, b1: Tensor | None, glu: bool) -> tuple[Tensor, Tensor]:
        pre = F.linear(x, w1, b1)
        if not glu:
            return pre, F.gelu(pre)
        a, g = pre.chunk(2, dim=-1)
        return pre, F.gelu(a) * g

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, chunks: int, glu: bool):
        out = x.new_empty(*x.shape[:-1], w2.shape[0])
        for xs, os in zip(x.chunk(chunks, dim=1), out.chunk(chunks, dim=1)):
            os.copy_(F.linear(_LeanFeedForward._hidden(xs, w1, b1, glu)[1], w2, b2))
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.chunks, ctx.glu = chunks, glu
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
        db1 = None if b1 is None else torch.zeros_like(b1)
        db2 = None if b2 is None else torch.zeros_like(b2)
        for xs, ds, dxs in zip(
            x.chunk(ctx.chunks, dim=1), d_out.chunk(ctx.chunks, dim=1), dx.chunk(ctx.chunks, dim=1)
        ):
            pre, hidden = _LeanFeedForward._hidden(xs, w1, b1, ctx.glu)
            xs, ds = xs.reshape(-1, xs.shape[-1]), ds.reshape(-1, ds.shape[-1])
            dw2.addmm_(ds.T, hidden.reshape(-1, hidden.shape[-1]))
            d_hidden = (ds @ w2).view(hidden.shape)
            if ctx.glu:
                a, g = pre.chunk(2, dim=-1)
                d_pre = torch.cat(
                    (torch.ops.aten.gelu_backward(d_hidden * g, a), d_hidden * F.gelu(a)), dim=-1
                )
            else:
                d_pre = torch.ops.aten.gelu_backward(d_hidden, pre)
            d_pre = d_pre.reshape(-1, d_pre.shape[-1])
            dw1.addmm_(d_pre.T, xs)
            dxs.copy_((d_pre @ w1).view(dxs.shape))
            if db1 is not None:
                db1 += d_pre.sum(0)
            if db2 is not None:
                db2 += ds.sum(0)
        return dx, dw1, db1, dw2, db2, None, None


class FeedForwardChunks(Chunk):
    """:class:`~longrange.modules.feedforward.Chunk` around a GELU :class:`FeedForward`
    (the reference's ``Chunk(ff_chunks, FeedForward(...), along_dim=1)``, same weights). In
    training it runs :class:`_LeanFeedForward`, so the hidden activations are neither stored
    nor formed for more than one of ``chunks`` slices at a time; with dropout or another
    activation it is the plain chunked layer."""

    def __init__(self, chunks: int, fn: FeedForward) -> None:
        super().__init__(chunks, fn, along_dim=1)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        ff = self.fn
        lean = (
            torch.is_grad_enabled()
            and type(ff.act) is nn.GELU
            and ff.act.approximate == "none"
            and (ff.dropout.p == 0 or not self.training)
        )
        if not lean:
            return super().forward(x, **kwargs)
        return _LeanFeedForward.apply(
            x, ff.w1.weight, ff.w1.bias, ff.w2.weight, ff.w2.bias, self.chunks, ff.glu
        )


class Branch(nn.Module):
    """One residual branch: pre-LayerNorm, pre-ScaleNorm or a ReZero gate (``norm`` "layer",
    "scale", "rezero"), then an optional token shift honouring the padding mask, then ``fn``.
    With a decoding ``cache`` the shift continues from the positions cached there.

    ``recompute``: in training, keep only the branch input and run the branch again in
    backward (activation checkpointing), so that its activations never outlive the branch.
    """

    def __init__(
        self, dim: int, fn: nn.Module, *, norm: str, shifts: tuple[int, ...] | None, recompute: bool = False
    ) -> None:
        super().__init__()
        if norm not in ("layer", "scale", "rezero"):
            raise ValueError(f"norm must be 'layer', 'scale' or 'rezero', got {norm!r}")
        self.norm = {"layer": nn.LayerNorm(dim), "scale": ScaleNorm(dim), "rezero": None}[norm]
        self.g = nn.Parameter(torch.tensor(1e-3)) if norm == "rezero" else None
        self.fn = fn
        self.shifts = shifts
        self.recompute = recompute

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, cache: dict | None = None, **kwargs
    ) -> Tensor:
        # a reversible stack's backward already re-runs the branch: no second recomputation
        if self.recompute and cache is None and torch.is_grad_enabled() and not in_recomputation():
            return checkpoint(self._run, x, mask, None, use_reentrant=False, **kwargs)
        return self._run(x, mask, cache, **kwargs)

    def _run(self, x: Tensor, mask: Tensor | None, cache: dict | None, **kwargs) -> Tensor:
        h = x if self.norm is None else self.norm(x)
        if self.shifts:
            past = None if cache is None else cache.get("shift")
            shifted = shift_tokens(h, self.shifts, mask, past=past)
            if cache is not None:
                cache["shift"] = (h if past is None else torch.cat((past, h), dim=1))[:, -max(self.shifts) :]
            h = shifted
        out = self.fn(h, mask=mask, cache=cache, **kwargs)
        return out if self.g is None else out * self.g
