"""``Autopadder``: run a network that needs lengths in multiples of a block size on any length.

The input (and its ``mask`` / ``input_mask``, and ``context`` / ``context_mask``) is padded on
the right up to the multiple; padded positions are masked out; the output is cut back to the
input length. Right padding keeps causal models exact: real positions never see the pad.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.checks import is_positive_int


def pad_to_multiple(x: Tensor, multiple: int, *, dim: int = 1, value: float = 0) -> tuple[Tensor, int]:
    """Pad ``x`` on the right of ``dim`` to a multiple (a positive int); return it and the pad
    length."""
    if not is_positive_int(multiple):
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    length = x.shape[dim]
    pad = (-length) % multiple
    if pad == 0:
        return x, 0
    spec = [0, 0] * (x.dim() - (dim % x.dim()) - 1) + [0, pad]
    return F.pad(x, spec, value=value), pad


class Autopadder(nn.Module):
    def __init__(
        self, net: nn.Module, pad_multiple: int | None = None, context_pad_multiple: int | None = None
    ):
        super().__init__()
        multiple = pad_multiple if pad_multiple is not None else getattr(net, "pad_multiple", None)
        if not is_positive_int(multiple):
            raise ValueError(
                "Autopadder needs pad_multiple (a positive int) or a net with a pad_multiple attribute; "
                f"got {multiple!r}"
            )
        self.net = net
        self.pad_multiple = multiple
        if context_pad_multiple is None:
            context_pad_multiple = getattr(net, "context_pad_multiple", None) or multiple
        # a negative multiple would crop the context, a fraction skip its padding: both silently
        if not is_positive_int(context_pad_multiple):
            raise ValueError(
                f"context_pad_multiple must be a positive int or None, got {context_pad_multiple!r}"
            )
        self.context_pad_multiple = context_pad_multiple

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        length = x.shape[1]
        padded, pad = pad_to_multiple(x, self.pad_multiple, dim=1)
        if pad:
            mask_key = "input_mask" if "input_mask" in kwargs else "mask"
            mask = kwargs.get(mask_key)
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            kwargs[mask_key] = pad_to_multiple(mask, self.pad_multiple, dim=1, value=False)[0]
        context = kwargs.get("context")
        if context is not None:
            kwargs["context"], cpad = pad_to_multiple(context, self.context_pad_multiple, dim=1)
            if cpad:
                cmask = kwargs.get("context_mask")
                if cmask is None:
                    cmask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
                kwargs["context_mask"] = pad_to_multiple(
                    cmask, self.context_pad_multiple, dim=1, value=False
                )[0]
        out = self.net(padded, **kwargs)
        if not pad:
            return out
        if isinstance(out, tuple):
            return (out[0][:, :length], *out[1:])
        return out[:, :length]
