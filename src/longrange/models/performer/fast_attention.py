"""FAVOR+ attention over heads (``FastAttention``) and the kernel functions it can use.

Names and keywords follow ``performer_pytorch`` (1.1.4); the maths lives in
:mod:`longrange.ops.favor`. Where this differs from the reference, it is on purpose:
- padding masks remove masked keys from the numerator and the normaliser (the reference only
  zeroed their values, so they still counted in the normaliser);
- causal attention is strictly causal: no feature epsilon and a running key stabiliser instead
  of the reference's sequence-wide max (see :mod:`longrange.ops.favor.features`); it runs in
  chunks of ``chunk_size`` positions with O(N (M + E) + N C) memory, in any float dtype;
- causal attention continues from (and returns) its running sums, so decoding costs O(1)
  per token.

Dimensions: B batch, H heads, N positions, L key positions, D head width, M features.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from longrange.models.state import state_entry
from longrange.ops import favor

# the running sums a causal layer keeps in a decoding State (ops/ sits below models/, so the
# entry type is registered here)
state_entry(favor.FavorState)

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
    causal op ("auto": fused for the softmax kernel, chunked for the others); non-causal, the
    softmax kernel runs fused for "auto" and "fused", the feature maps then
    :func:`~longrange.ops.favor.linear_attention` otherwise.
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
        chunk_size: int = favor.CHUNK_SIZE,
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
        softmax_kernel = not (self.no_projection or self.generalized_attention)
        if not self.causal:
            if state is not None:
                raise ValueError("only causal attention continues from a state")
            if softmax_kernel and self.backend in ("auto", "fused"):
                proj = self.projection_matrix
                return favor.softmax_noncausal_attention(q, k, v, proj, mask=mask, eps=self.feature_eps), None
            fq, fk, _ = self.features(q, k, mask)
            return favor.linear_attention(fq, fk, v).to(v.dtype), None
        if k.shape[-2] != q.shape[-2]:
            raise ValueError("causal attention needs as many keys as queries")
        one_step = state is not None and q.shape[-2] == 1 and not torch.is_grad_enabled()
        if softmax_kernel and self.backend in ("auto", "fused"):
            if one_step and mask is None:
                return favor.softmax_causal_step(q, k, v, self.projection_matrix, state)
            if not one_step:
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
