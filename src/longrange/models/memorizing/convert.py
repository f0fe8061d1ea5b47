"""Weights of a memorizing-transformers-pytorch model, for ``longrange.convert.load_reference``."""

from __future__ import annotations

from torch import Tensor

from longrange.convert import copy_weights, register_converter
from longrange.models.memorizing.model import MemorizingLM

# our block's parts -> the reference layer's
_PARTS = {
    "attn_norm": "0.norm",
    "attn": "0.fn",
    "ff_norm": "1.norm",
    "ff.w1": "1.fn.net.0",
    "ff.w2": "1.fn.net.3",
}


def convert_reference(model: MemorizingLM, reference: dict[str, Tensor]) -> None:
    """Map memorizing-transformers-pytorch names onto ours; ValueError when a weight on
    either side has no counterpart or a shape differs."""
    mapping = {
        "embed.weight": "token_emb.weight",
        "rel_pos.relative_attention_bias.weight": "rel_pos_bias.relative_attention_bias.weight",
        "knn_rel_pos.relative_attention_bias.weight": "knn_rel_pos_bias.relative_attention_bias.weight",
        "norm.weight": "to_logits.0.weight",
        "norm.bias": "to_logits.0.bias",
        "head.weight": "to_logits.1.weight",
        "head.bias": "to_logits.1.bias",
    }
    for name in model.state_dict():
        if not name.startswith("blocks."):
            continue
        _, index, rest = name.split(".", 2)
        for ours, theirs in sorted(_PARTS.items(), key=lambda kv: -len(kv[0])):
            if rest.startswith(ours + "."):
                mapping[name] = f"layers.{index}.{theirs}{rest[len(ours) :]}"
                break
    unused = sorted(set(reference) - set(mapping.values()))
    if unused:
        raise ValueError(
            f"reference weights with no place in this model (built with other keywords?): {unused[:5]}"
        )
    copy_weights(model, reference, mapping)


register_converter(MemorizingLM, convert_reference)
