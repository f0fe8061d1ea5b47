"""Loading ``routing_transformer`` (1.6.1) weights into the routing family's models.

:func:`convert_reference` copies a reference model's state dict (LM, block stack or
encoder-decoder) into ours, k-means centroids included; every one of our weights must be
found. Names differ in three ways: the block stacks' layouts (:func:`longrange.convert.rename_blocks`),
the reference's ``PreShiftTokens`` wrapper around a branch's function (ours shifts inside the
branch), and the reference wrapper's Autopadder (``dec.net.net``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from longrange.convert import copy_weights, register_converter, rename_blocks
from longrange.models.routing.compat import RoutingTransformerEncDec
from longrange.models.routing.model import RoutingBody, RoutingLM
from longrange.modules.positional import AbsolutePositionalEmbedding


def _our_name(key: str, shift: bool) -> str:
    key = rename_blocks(key)
    if shift:
        key = re.sub(r"(layers\.blocks\.\d+\.[fg]\.)fn\.fn\.", r"\1fn.", key)
    return re.sub(r"^dec\.net\.net\.", "dec.net.", key)


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``routing_transformer`` model's state dict into ``model`` (see the module
    docstring); ValueError when one of our weights is missing or a shape differs."""
    shift = any(m.config.shift_tokens for m in model.modules() if isinstance(m, RoutingBody))
    renamed = {_our_name(k, shift): v for k, v in reference.items()}
    ours = model.state_dict()
    for key, tensor in ours.items():
        theirs = renamed.get(key)
        if (
            key.endswith(("mem_key", "mem_value"))
            and theirs is not None
            and theirs.shape[2] < tensor.shape[2]
        ):
            # a causal layer here has at least one memory key where the reference may have
            # none: the reference's keys fill the first slots, the extra ones stay as they are
            renamed[key] = torch.cat((theirs.to(tensor), tensor[:, :, theirs.shape[2] :]), dim=2)
    missing = [k for k in ours if k not in renamed and not k.endswith("abs_pos_emb.emb.weight")]
    if missing:
        raise ValueError(f"reference state dict has no weight for {missing[:5]}")
    copy_weights(model, renamed, {k: k for k in ours if k in renamed})
    for name, module in model.named_modules():
        if isinstance(module, AbsolutePositionalEmbedding) and f"{name}.emb.weight" not in renamed:
            # routing_transformer 1.6.1 accepts use_absolute_pos_emb but never adds positions
            with torch.no_grad():
                module.emb.weight.zero_()


for _model_class in (RoutingLM, RoutingBody, RoutingTransformerEncDec):
    register_converter(_model_class, convert_reference)
