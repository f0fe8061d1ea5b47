"""Random feature maps of FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

- :func:`gaussian_orthogonal_random_matrix`: M projection rows in D dimensions, drawn in blocks
  of D mutually orthogonal rows (QR of a Gaussian matrix); ``scaling=0`` gives each row the norm
  of a Gaussian vector (chi-distributed, so each row is marginally Gaussian), ``scaling=1`` the
  norm sqrt(D). ``orthogonal=False`` draws i.i.d. Gaussian rows (the paper's baseline).
- :func:`softmax_query_features` / :func:`softmax_key_features`: the positive softmax kernel
  phi(x) = M^-1/2 exp(w x' - |x'|^2 / 2), x' = x D^-1/4, so that E[phi(q) phi(k)] =
  exp(q k / sqrt(D)). Each call subtracts a stabiliser c before the exponential:
  queries use their own max (it cancels between numerator and normaliser); keys use one c for
  every key a query sees. Non-causal: the max over all unmasked keys (the reference's choice).
  Causal: a running maximum over positions, returned as the keys' ``log_scale`` so that the
  causal ops can rescale exp(c_i - c_t) <= 1 (docs/CAUSALITY.md, "FAVOR+: the stabiliser");
  no epsilon is added to causal features, so the result is exactly invariant to the stabiliser
  and to later keys.
  Non-causal features may carry the reference's epsilon (``eps``, 1e-4 there) for parity.
- :func:`generalized_features`: kernel_fn(x' W^T) + eps (default ReLU, eps 1e-3); without a
  projection kernel_fn(x') + eps. A function of each position alone, so no stabiliser.
- :func:`no_projection_features`: the "efficient attention" map: queries softmax over D; keys
  softmax over the sequence (non-causal) or exp with a running maximum (causal).

Masked keys (``mask`` False) get all-zero features, so they leave both the numerator and the
normaliser. Features are computed in float32 for half-precision inputs.

Dimensions: B batch, H heads, N positions, D head width, M features.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from longrange.ops.numerics import exp_normal_

# The stabiliser of a prefix with no unmasked key yet: finite, so that differences stay defined.
EMPTY_LOG_SCALE = -1e30


def _check_matrix_size(nb_rows: int, nb_columns: int, scaling: int) -> None:
    for name, value in (("nb_rows", nb_rows), ("nb_columns", nb_columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 (chi-distributed row norms) or 1 (sqrt(d)), got {scaling!r}")


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    scaling: int = 0,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Projection matrix W [M = nb_rows, D = nb_columns] in float32.

    Drawn on the CPU (QR there; ``generator`` must be a CPU generator) and moved to ``device``.
    """
    _check_matrix_size(nb_rows, nb_columns, scaling)
    if orthogonal:
        blocks = []
        for start in range(0, nb_rows, nb_columns):
            gauss = torch.randn(nb_columns, nb_columns, generator=generator)
            q, _ = torch.linalg.qr(gauss, mode="reduced")
            blocks.append(q.T[: nb_rows - start])
        matrix = torch.cat(blocks)
        if scaling == 0:
            norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
        else:
            norms = torch.full((nb_rows,), math.sqrt(nb_columns))
        matrix = matrix * norms[:, None]
    else:
        matrix = torch.randn(nb_rows, nb_columns, generator=generator)
        if scaling == 1:
            matrix = matrix / matrix.norm(dim=1, keepdim=True) * math.sqrt(nb_columns)
    return matrix.to(device)


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_key_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A key padding mask [B, N] (True = keep) for keys x [B, H, N, D], checked -> [B, 1, N]
    broadcastable over heads (None stays None)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape != (x.shape[0], x.shape[-2]):
        raise ValueError(
            f"mask must be a bool tensor [B, N] = {[x.shape[0], x.shape[-2]]}, got {mask.dtype} "
            f"{list(mask.shape)}"
        )
    return mask[:, None, :]


def _projected(x: Tensor, projection: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """x [B, H, N, D] -> (x' W^T [B, H, N, M], |x'|^2 / 2 [B, H, N, 1]), x' = x D^-1/4.

    The normaliser scales the small matrix W, not x.
    """
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(
            f"projection must be [M, D] with D = {x.shape[-1]} (the head width), got {list(projection.shape)}"
        )
    x = _upcast(x)
    scale = x.shape[-1] ** -0.25 if normalize else 1.0
    with torch.autocast(x.device.type, enabled=False):  # the exponent is float32 under autocast too
        dash = x @ (projection.to(x.dtype) * scale).T
    half_sq_norm = x.square().sum(-1, keepdim=True) * (scale**2 / 2)
    return dash, half_sq_norm


def running_log_scale(row_max: Tensor, mask: Tensor | None = None, initial: Tensor | None = None) -> Tensor:
    """Causal stabiliser c_t = max(initial, max over unmasked i <= t of row_max_i).

    row_max: [B, H, N]; mask: [B, 1, N]; initial: [B, H] (the state's stabiliser when a
    sequence continues). Returns [B, H, N], non-decreasing along N.
    """
    if mask is not None:
        row_max = row_max.masked_fill(~mask, EMPTY_LOG_SCALE)
    if initial is not None:
        row_max = torch.cat((initial[..., None].to(row_max.dtype), row_max), dim=-1)
    running = row_max.cummax(dim=-1).values.clamp_min(EMPTY_LOG_SCALE)
    return running[..., 1:] if initial is not None else running


def _exp_features(dash: Tensor, shift: Tensor, ratio: float, eps: float) -> Tensor:
    """ratio * (exp(dash - shift) + eps), in as few passes over [B, H, N, M] as possible."""
    if eps:
        return (exp_normal_(dash - shift) + eps) * ratio
    return exp_normal_(dash - (shift - math.log(ratio)))


def softmax_query_features(
    q: Tensor, projection: Tensor, *, normalize: bool = True, eps: float = 0.0
) -> Tensor:
    """phi(q) [B, H, N, M] for q [B, H, N, D], stabilised by each query's own max."""
    dash, half_sq = _projected(q, projection, normalize)
    stab = dash.detach().amax(dim=-1, keepdim=True)
    if not eps:
        # the largest log-feature, so that a long query's features cannot all underflow; with
        # an epsilon the reference's max of w q' is kept, since then the choice matters
        stab = stab - half_sq.detach()
    return _exp_features(dash, half_sq + stab, projection.shape[0] ** -0.5, eps)


def softmax_key_features(
    k: Tensor,
    projection: Tensor,
    *,
    causal: bool,
    mask: Tensor | None = None,
    normalize: bool = True,
    eps: float = 0.0,
    initial_log_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """phi(k) [B, H, N, M] for k [B, H, N, D] and, when causal, the running stabiliser
    ``log_scale`` [B, H, N] that key i's features were divided by (exp(c_i)); else None.

    mask: [B, N], True = keep; masked keys get zero features and never raise the stabiliser.
    initial_log_scale: [B, H], the stabiliser of the running sums a causal sequence continues.
    """
    keep = check_key_mask(mask, k)
    dash, half_sq = _projected(k, projection, normalize)
    ratio = projection.shape[0] ** -0.5
    if causal:
        if eps:
            raise ValueError(
                "eps must be 0 for causal key features: an epsilon inside the features makes the "
                "output depend on the running stabiliser, i.e. on later keys"
            )
        # the largest log-feature of each key: max_m (w_m x') - |x'|^2 / 2
        row_max = dash.detach().amax(dim=-1) - half_sq.detach()[..., 0]
        log_scale = running_log_scale(row_max, keep, initial_log_scale)
        # a masked key may exceed the running max; its own max keeps its (zeroed) features finite
        shift = torch.maximum(log_scale, row_max) if keep is not None else log_scale
        feats = _exp_features(dash, half_sq + shift[..., None], ratio, 0.0)
    else:
        if initial_log_scale is not None:
            raise ValueError("initial_log_scale applies to causal features only")
        # one stabiliser for all keys of a row: the max over unmasked keys and features
        row_max = dash.detach().amax(dim=-1, keepdim=True)
        if not eps:
            row_max = row_max - half_sq.detach()  # as for queries: the largest log-feature
        if keep is None:
            stab = row_max.amax(dim=-2, keepdim=True)
        else:
            stab = row_max.masked_fill(~keep[..., None], float("-inf")).amax(dim=-2, keepdim=True)
            stab = torch.maximum(stab, row_max)  # equal to stab on unmasked keys
        feats = _exp_features(dash, half_sq + stab, ratio, eps)
        log_scale = None
    if keep is not None:
        feats = feats * keep[..., None]
    return feats, log_scale


def generalized_features(
    x: Tensor,
    projection: Tensor | None,
    *,
    kernel_fn: Callable[[Tensor], Tensor],
    eps: float = 1e-3,
    normalize: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """kernel_fn(x' W^T) + eps: [B, H, N, M] (or [B, H, N, D] without a projection).

    mask: [B, N] (keys only), True = keep; masked positions get zero features.
    """
    keep = check_key_mask(mask, x)
    if projection is None:
        x = _upcast(x)
        feats = kernel_fn(x * x.shape[-1] ** -0.25 if normalize else x) + eps
    else:
        dash, _ = _projected(x, projection, normalize)
        feats = kernel_fn(dash) + eps
    if keep is not None:
        feats = feats * keep[..., None]
    return feats


def no_projection_features(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool,
    mask: Tensor | None = None,
    initial_log_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(phi(q), phi(k), log_scale) without random features: q softmax over D; k softmax over N
    (non-causal, unmasked keys only) or exp(k - c_t) with the running max c_t (causal)."""
    keep = check_key_mask(mask, k)
    q, k = _upcast(q), _upcast(k)
    q_feats = q.softmax(dim=-1)
    if causal:
        row_max = k.detach().amax(dim=-1)
        log_scale = running_log_scale(row_max, keep, initial_log_scale)
        shift = torch.maximum(log_scale, row_max) if keep is not None else log_scale
        k_feats = exp_normal_(k - shift[..., None])
        if keep is not None:
            k_feats = k_feats * keep[..., None]
        return q_feats, k_feats, log_scale
    if initial_log_scale is not None:
        raise ValueError("initial_log_scale applies to causal features only")
    if keep is not None:
        k = k.masked_fill(~keep[..., None], float("-inf"))
    # a row whose keys are all masked has -inf everywhere: its softmax is NaN, make it zeros
    k_feats = k.softmax(dim=-2).nan_to_num(0.0)
    return q_feats, k_feats, None
