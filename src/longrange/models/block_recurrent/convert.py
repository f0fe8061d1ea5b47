"""Weights of a block-recurrent-transformer-pytorch model, for ``longrange.convert.load_reference``."""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.convert import copy_weights, register_converter
from longrange.models.block_recurrent.model import BlockRecurrentLM

_BOX_NAMES = (
    "q_to_state.weight",
    "q_from_state.weight",
    "state_to_q.weight",
    "state_to_kv.weight",
    "init_state",
    "state_pos_ids",
    "to_state_out.weight",
    "learned_ema_beta",
    "state_out_to_gate.weight",
    "state_out_to_gate.bias",
)
# our qk-norm of each state attention -> the reference's
_QK_NAMES = {
    "read_qk": "to_state_cross_attn",
    "self_qk": "state_self_attn",
    "write_qk": "from_state_cross_attn",
}


def convert_reference(model: BlockRecurrentLM, reference: dict[str, Tensor]) -> None:
    """Copy a block-recurrent-transformer-pytorch ``state_dict`` into ``model`` (built with
    the same keywords)."""
    expected = model.config.dim_head**-0.5
    uses_qk_norm = any(layer.qk_norm is not None for layer in model.layers)
    if uses_qk_norm and abs(model.config.qk_rmsnorm_scale - expected) > 1e-12:
        raise ValueError(
            f"the reference scales qk-normalised scores by dim_head ** -0.5 = {expected:.6g}; build the "
            f"model with qk_rmsnorm_scale={expected!r} (got {model.config.qk_rmsnorm_scale})"
        )
    if model.config.gate_type != "fixed":
        raise ValueError("the reference has only the fixed gate; build the model with gate_type='fixed'")
    ref = dict(reference)
    mapping = {
        "embed.weight": "token_emb.weight",
        "norm.weight": "to_logits.0.gamma",
        "head.weight": "to_logits.1.weight",
    }
    for i, layer in enumerate(model.layers):
        src, dst = f"layers.{i}.0.", f"layers.{i}."
        mapping[dst + "norm.weight"] = src + "norm.gamma"
        for name in ("to_q", "to_kv", "to_out"):
            mapping[f"{dst}{name}.weight"] = f"{src}{name}.weight"
        if layer.qk_norm is not None:
            mapping[dst + "qk_norm.q_scale"] = src + "attn.q_scale"
            mapping[dst + "qk_norm.k_scale"] = src + "attn.k_scale"
        if layer.state_container is not None:
            box, ref_box = dst + "state_container.", src + "state_container."
            mapping[box + "state_norm.weight"] = ref_box + "state_norm.gamma"
            for name in _BOX_NAMES:
                mapping[box + name] = ref_box + name
            if layer.state_container.read_qk is not None:
                for ours, theirs in _QK_NAMES.items():
                    for part in ("q_scale", "k_scale"):
                        mapping[f"{box}{ours}.{part}"] = f"{ref_box}{theirs}.{part}"
        mapping[dst + "ff_norm.weight"] = f"layers.{i}.1.0.gamma"
        mapping[dst + "ff.w2.weight"] = f"layers.{i}.1.3.weight"
        w1 = ref.get(f"layers.{i}.1.1.weight")
        if w1 is not None:
            # The reference gates as value * gelu(gate); ours as gelu(first half) * second half.
            value, gate = w1.chunk(2, dim=0)
            ref[f"layers.{i}.1.1.weight (gate first)"] = torch.cat((gate, value), dim=0)
        mapping[dst + "ff.w1.weight"] = f"layers.{i}.1.1.weight (gate first)"
        if model.config.use_compressed_mem:
            for part in ("weight", "bias"):
                mapping[f"memory.compress.{i}.{part}"] = f"mem_manager.layers.{i}.1.1.{part}"
    used = set(mapping.values()) | {f"layers.{i}.1.1.weight" for i in range(model.config.depth)}
    unused = sorted(k for k in reference if k not in used and not k.endswith(".beta"))
    if unused:
        raise ValueError(f"reference weights with no place in this model (different keywords?): {unused[:5]}")
    copy_weights(model, ref, mapping)


register_converter(BlockRecurrentLM, convert_reference)
