"""One residual branch of a block: normalise (or gate), token-shift, then the branch's layer.

:class:`Branch` is the ``f`` or ``g`` of a ``modules.reversible`` stack for the families
whose blocks are pre-norm / ReZero branches (performer, sinkhorn, routing):

- ``norm="layer"`` or ``"scale"``: ``fn(norm(x))`` with an ``nn.LayerNorm`` or a
  :class:`~longrange.modules.norms.ScaleNorm` (parameter ``norm``);
- ``norm="rezero"``: ``fn(x) * gate``, the gate a learned parameter. Its name, shape and
  initial value differ between the references (performer: ``g``, a scalar at 1e-3; sinkhorn:
  ``g``, shape [1] at 0; routing: ``residual_weight``, shape [1] at 0), so they are arguments:
  saved weights and the reference converters keep their names.
- ``shifts``: a token shift (:func:`~longrange.modules.shift.shift_tokens`) after the norm,
  honouring the padding mask that arrives under ``mask_key`` ("mask" or "input_mask"); the
  mask is passed on to ``fn`` under the same name. With a decoding ``cache`` (a dict, see
  ``modules.reversible`` ``forward_cached``) the shift continues from the last positions kept
  in ``cache["shift"]``, and ``fn`` receives the same dict as ``cache=`` for its own entries.
- a ``fn`` with ``takes_norm = True`` (performer's lean feed-forward) is handed the norm as
  ``norm=`` instead of the normalised input when nothing comes between them (no shift, no
  cache), so that it can form the normalised input again in backward instead of keeping it.
- ``recompute``: in training, keep only the branch input and run the branch again in backward
  (activation checkpointing), so its activations never outlive it. Not inside a reversible
  stack's own backward re-run (that already recomputes) and not while decoding.

A result ``(out, aux_loss)`` of ``fn`` keeps its auxiliary loss; only ``out`` is gated.
Dimensions: B batch, N positions, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.modules.norms import ScaleNorm
from longrange.modules.reversible import in_recomputation
from longrange.modules.shift import shift_tokens

NORMS = ("layer", "scale", "rezero")


class Branch(nn.Module):
    """x [B, N, D] -> fn(shift(norm(x))) [B, N, D] (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        fn: nn.Module,
        *,
        norm: str = "layer",
        shifts: Sequence[int] | None = None,
        recompute: bool = False,
        mask_key: str = "mask",
        gate: str = "g",
        gate_init: float = 0.0,
        gate_shape: tuple[int, ...] = (1,),
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = {"layer": nn.LayerNorm, "scale": ScaleNorm}[norm](dim) if norm != "rezero" else None
        self.gate = gate if norm == "rezero" else None
        if self.gate is not None:
            self.register_parameter(gate, nn.Parameter(torch.full(gate_shape, float(gate_init))))
        self.fn = fn
        self.shifts = tuple(shifts) if shifts else None
        self.recompute = recompute
        self.mask_key = mask_key

    def forward(self, x: Tensor, *, cache: dict | None = None, **kwargs):
        if self.recompute and cache is None and torch.is_grad_enabled() and not in_recomputation():
            return checkpoint(self._run, x, None, use_reentrant=False, **kwargs)
        return self._run(x, cache, **kwargs)

    def _run(self, x: Tensor, cache: dict | None, **kwargs):
        if (
            cache is None
            and not self.shifts
            and self.norm is not None
            and getattr(self.fn, "takes_norm", False)
        ):
            out = self.fn(x, norm=self.norm, **kwargs)
        else:
            h = x if self.norm is None else self.norm(x)
            if self.shifts:
                h = self._shift(h, kwargs.get(self.mask_key), cache)
            out = self.fn(h, **kwargs) if cache is None else self.fn(h, cache=cache, **kwargs)
        if self.gate is None:
            return out
        gate = getattr(self, self.gate)
        return (out[0] * gate, *out[1:]) if isinstance(out, tuple) else out * gate

    def _shift(self, h: Tensor, mask: Tensor | None, cache: dict | None) -> Tensor:
        past = None if cache is None else cache.get("shift")
        shifted = shift_tokens(h, self.shifts, mask, past=past)
        if cache is not None:
            cache["shift"] = (h if past is None else torch.cat((past, h), dim=1))[:, -max(self.shifts) :]
        return shifted

    def extra_repr(self) -> str:
        kind = "rezero" if self.norm is None else type(self.norm).__name__
        return f"norm={kind}, shifts={self.shifts}, recompute={self.recompute}"
