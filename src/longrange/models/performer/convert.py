"""Copying a ``performer_pytorch`` model's weights into ours (``longrange.convert``).

The reference's LM, stack or encoder-decoder, plain or reversible, with or without token
shift, maps onto the same classes built with the same keywords: projection matrices and the
redraw counter included, fixed sinusoid tables skipped (ours are recomputed, not saved).
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from longrange.convert import copy_weights, register_converter, rename_blocks
from longrange.models.performer.compat import PerformerEncDec
from longrange.models.performer.model import PerformerBody, PerformerModel

# reference weights with no counterpart here: fixed sinusoid tables, local attention's rotary
# frequencies, and the redraw helper's alias of the stack
_SKIPPED = re.compile(
    r"(^|\.)(layer_pos_emb\.emb|pos_emb\.emb|proj_updater\.instance\..*|rel_pos\.inv_freq)$"
)


def _candidates(key: str) -> list[str]:
    key = rename_blocks(key)
    key = re.sub(r"(^|\.)proj_updater\.calls_since_last_redraw$", r"\1calls_since_last_redraw", key)
    return [
        key,
        # PreScaleNorm keeps its scale as .g beside .fn; ours sits in the norm
        re.sub(r"(layers\.blocks\.\d+\.[fg]\.)g$", r"\1norm.g", key),
        # PreShiftTokens wraps the branch's function once more
        re.sub(r"(layers\.blocks\.\d+\.[fg]\.)fn\.fn\.", r"\1fn.", key),
    ]


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``performer_pytorch`` state dict into ``model`` (PerformerModel, PerformerBody
    or PerformerEncDec built with the same keywords); every one of our weights must be found."""
    ours = model.state_dict()
    renamed: dict[str, Tensor] = {}
    unmatched = []
    for key, value in reference.items():
        if _SKIPPED.search(key):
            continue
        name = next((c for c in _candidates(key) if c in ours), None)
        if name is None:
            unmatched.append(key)
            continue
        renamed[name] = value.reshape(ours[name].shape) if value.numel() == ours[name].numel() else value
    missing = [k for k in ours if k not in renamed]
    if unmatched or missing:
        raise ValueError(
            f"reference and model do not match: reference weights without a place {unmatched[:5]}, "
            f"our weights without a source {missing[:5]}"
        )
    copy_weights(model, renamed, {k: k for k in ours})


for _cls in (PerformerModel, PerformerBody, PerformerEncDec):
    register_converter(_cls, convert_reference)
