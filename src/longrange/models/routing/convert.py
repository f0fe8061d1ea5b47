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

# reference entries with no counterpart here: fixed sinusoid tables and rotary frequencies
# (ours are recomputed), the wrapper's second reference to its net, and a tied output
# matrix (the token embedding itself)
_SKIPPED = re.compile(r"(^|\.)(sinu_pos_emb\.emb|rel_pos\.inv_freq|out\.tensor)$|^dec\.base_net\.")


def _our_name(key: str, shifting: tuple[str, ...]) -> str:
    """Our name for the reference's ``key``: the block layout renamed, the Autopadder of the
    reference's wrapper dropped and, inside a stack that shifts tokens (``shifting``: our
    names' prefixes for those; an encoder-decoder may shift on one side only), its
    ``PreShiftTokens`` wrapper unwrapped."""
    key = re.sub(r"^dec\.net\.net\.", "dec.net.", rename_blocks(key))
    if key.startswith(shifting):
        key = re.sub(r"(layers\.blocks\.\d+\.[fg]\.)fn\.fn\.", r"\1fn.", key)
    return key


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``routing_transformer`` model's state dict into ``model`` (see the module
    docstring); ValueError when a weight on either side has no counterpart or a shape
    differs."""
    shifting = tuple(
        f"{name}." if name else ""
        for name, m in model.named_modules()
        if isinstance(m, RoutingBody) and m.config.shift_tokens
    )
    ours = model.state_dict()
    renamed = {_our_name(k, shifting): v for k, v in reference.items() if not _SKIPPED.search(k)}
    unplaced = [k for k in reference if not _SKIPPED.search(k) and _our_name(k, shifting) not in ours]
    if unplaced:
        raise ValueError(
            f"reference weights with no place in {type(model).__name__} (built with other keywords?): "
            f"{unplaced[:5]}"
        )
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
