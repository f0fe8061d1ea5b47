"""Copying a sinkhorn-transformer model's weights into ours (``longrange.convert``).

The stacks differ only in how they nest blocks (``rename_blocks``); context layers get an
identity ``to_kv`` (the reference attends to the raw context, which needs equal widths).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longrange.convert import register_converter, rename_blocks
from longrange.models.sinkhorn.model import SinkhornBody, SinkhornLM


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a sinkhorn-transformer state dict into ``model`` (a SinkhornLM or SinkhornBody
    built with the same keywords); every weight on either side must find its counterpart."""
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, tensor in reference.items():
        new = rename_blocks(name)
        if new not in ours:
            raise ValueError(
                f"reference weight {name!r} has no counterpart ({new!r}) in {type(model).__name__}"
            )
        if tuple(ours[new].shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {new!r}: ours {tuple(ours[new].shape)}, reference {tuple(tensor.shape)}"
            )
        mapped[new] = tensor
    for name, tensor in ours.items():
        if name in mapped:
            continue
        if name.endswith("to_kv.weight") and tensor.shape[0] == 2 * tensor.shape[1]:
            eye = torch.eye(tensor.shape[1], dtype=tensor.dtype, device=tensor.device)
            mapped[name] = torch.cat([eye, eye], dim=0)
            continue
        raise ValueError(
            f"{type(model).__name__} weight {name!r} has no counterpart in the reference state dict"
        )
    model.load_state_dict(mapped)


register_converter(SinkhornLM, convert_reference)
register_converter(SinkhornBody, convert_reference)
