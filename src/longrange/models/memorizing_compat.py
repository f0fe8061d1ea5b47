"""memorizing-transformers-pytorch compatibility: ``MemorizingTransformer`` and weight loading.

``MemorizingTransformer(num_tokens=, dim=, depth=, ...)`` takes the reference's keywords and
defaults and keeps its calling convention::

    with model.knn_memories_context(batch_size=B) as knn_memories:
        logits = model(x, knn_memories)                          # one chunk, memories updated
        loss, xl = model(x, knn_memories, xl_memories=xl, labels=y)  # with XL layers

Behaviour that differs from the reference, on purpose (SPEC.md): clearing on sos / eos token
ids works (per batch row, at the token's position; see ``memorizing_flow``); the relative
position bias stays aligned when XL memories make the keys longer than the queries (the
reference shifted every layer's bias by the XL length); the memory keeps keys and values
matched when it wraps around. ``memorizing_layers`` / ``xl_memory_layers`` outside
[1, depth] raise instead of being dropped silently.

``load_reference(model, reference.state_dict())`` copies the reference's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.convert import copy_weights, register_converter
from longrange.memory.knn import KNNMemoryList
from longrange.models.memorizing import MemorizingConfig, MemorizingLM
from longrange.models.memorizing_flow import MemorizingState, run_chunk


def _whole(name: str, value) -> int:
    """The reference types some integer keywords as floats (``shift_*_memories_down = 0.``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


def _layers(name: str, value, depth: int) -> tuple[int, ...]:
    layers = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(dict.fromkeys(_whole(name, v) for v in layers))


class MemorizingTransformer(MemorizingLM):
    """The reference's ``MemorizingTransformer``; also accepts a :class:`MemorizingConfig`.

    Extra keywords beyond the reference's map straight onto the config (``max_seq_len``:
    the chunk length used by ``forward_lm`` / ``generate``; ``knn_backend``, ``knn_index``,
    ``knn_gate_output``, ``attn_scale_init``, ...).
    """

    def __init__(
        self,
        config: MemorizingConfig | None = None,
        *,
        num_tokens: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        dim_head: int = 64,
        heads: int = 8,
        knn_attn_heads: int | None = None,
        attn_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
        memorizing_layers=None,
        max_knn_memories: int = 250000,
        num_retrieved_memories: int = 32,
        clear_memories_on_sos_token_id: int | None = None,
        clear_memories_on_eos_token_id: int | None = None,
        knn_memories_directory: str | None = None,
        shift_knn_memories_down: int | float = 0,
        pad_id: int = 0,
        xl_max_memories: int = 0,
        xl_memory_layers=None,
        shift_xl_memories_down: int | float = 0,
        knn_memory_multiprocessing: bool = False,
        max_seq_len: int = 65536,
        **extra,
    ) -> None:
        if config is None:
            missing = [
                k for k, v in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth)) if v is None
            ]
            if missing:
                raise TypeError(f"MemorizingTransformer needs the keyword(s) {missing}")
            unknown = sorted(set(extra) - set(MemorizingConfig.field_names()))
            if unknown:
                raise TypeError(f"MemorizingTransformer got unexpected keyword(s) {unknown}")
            if memorizing_layers is None:
                # The reference's default (depth // 2,) is dropped for depth 1: no memorizing layer.
                memorizing_layers = (depth // 2,) if depth // 2 >= 1 else ()
            config = MemorizingConfig(
                vocab_size=num_tokens,
                dim=dim,
                depth=depth,
                heads=heads,
                dim_head=dim_head,
                knn_attn_heads=knn_attn_heads,
                attn_dropout=attn_dropout,
                ff_mult=ff_mult,
                ff_dropout=ff_dropout,
                memorizing_layers=_layers("memorizing_layers", memorizing_layers, depth),
                max_knn_memories=max_knn_memories,
                num_retrieved_memories=num_retrieved_memories,
                clear_memories_on_sos_token_id=clear_memories_on_sos_token_id,
                clear_memories_on_eos_token_id=clear_memories_on_eos_token_id,
                knn_memories_directory=None
                if knn_memories_directory is None
                else str(knn_memories_directory),
                shift_knn_memories_down=_whole("shift_knn_memories_down", shift_knn_memories_down),
                pad_id=pad_id,
                xl_max_memories=_whole("xl_max_memories", xl_max_memories),
                xl_memory_layers=None
                if xl_memory_layers is None
                else _layers("xl_memory_layers", xl_memory_layers, depth),
                shift_xl_memories_down=_whole("shift_xl_memories_down", shift_xl_memories_down),
                knn_memory_multiprocessing=knn_memory_multiprocessing,
                max_seq_len=max_seq_len,
                **extra,
            )
        super().__init__(config)

    @property
    def memorizing_layers(self) -> tuple[int, ...]:
        return self.knn_layers

    @property
    def xl_memory_layers(self) -> tuple[int, ...]:
        return self.xl_layers

    @property
    def num_memory_layers(self) -> int:
        return len(self.knn_layers)

    @property
    def num_xl_memory_layers(self) -> int:
        return len(self.xl_layers)

    def forward(
        self,
        x: Tensor,
        knn_memories: list,
        xl_memories: list[Tensor] | None = None,
        labels: Tensor | None = None,
        add_knn_memory: bool = True,
    ):
        """One chunk x [B, N]: logits [B, N, V] (or the loss with ``labels``), plus the new
        XL memories (a list of [B, L, 2, D]; [B, L, dim] with ``xl_reproject``) when the model
        has XL layers."""
        self.check_tokens(x)
        batch = x.shape[0]
        if not isinstance(knn_memories, (list, tuple)):
            raise TypeError(f"knn_memories must be a KNNMemoryList, got {type(knn_memories).__name__}")
        if len(knn_memories) != len(self.knn_layers):
            raise ValueError(
                f"knn_memories has {len(knn_memories)} memories; the model has {len(self.knn_layers)} "
                "memorizing layers (use model.create_knn_memories)"
            )
        rows = {getattr(m, "num_indices", None) for m in knn_memories}
        if rows and rows != {batch}:
            raise ValueError(
                f"you passed an input with batch size {batch} but the kNN memories were created with "
                f"{sorted(rows, key=str)} rows; create them with batch_size={batch}"
            )
        xl = None
        if xl_memories is not None and len(xl_memories) and self.xl_layers:
            if len(xl_memories) != len(self.xl_layers):
                raise ValueError(
                    f"xl_memories must hold {len(self.xl_layers)} tensors, got {len(xl_memories)}"
                )
            xl = []
            # keys/values [B, L, 2, D], or with xl_reproject the layer inputs [B, L, dim]
            entry = (self.config.dim,) if self.config.xl_reproject else (2, self.config.head_width)
            for t in xl_memories:
                if t.dim() != 2 + len(entry) or t.shape[0] != batch or tuple(t.shape[2:]) != entry:
                    raise ValueError(
                        f"each XL memory must have shape ({batch}, L, {', '.join(map(str, entry))}), "
                        f"got {tuple(t.shape)}"
                    )
                xl.append((t, torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)))
        state = MemorizingState(batch, KNNMemoryList(knn_memories), xl)
        logits = run_chunk(self, x, None, state, commit=True, add_knn_memory=add_knn_memory)
        new_xl = [kv for kv, _ in state.xl] if self.xl_layers else None
        if labels is None:
            return logits if new_xl is None else (logits, new_xl)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.config.pad_id)
        return loss if new_xl is None else (loss, new_xl)


def _convert(model: MemorizingLM, reference: dict[str, Tensor]) -> None:
    """Map memorizing-transformers-pytorch names onto ours."""
    mapping = {
        "embed.weight": "token_emb.weight",
        "rel_pos.relative_attention_bias.weight": "rel_pos_bias.relative_attention_bias.weight",
        "knn_rel_pos.relative_attention_bias.weight": "knn_rel_pos_bias.relative_attention_bias.weight",
        "norm.weight": "to_logits.0.weight",
        "norm.bias": "to_logits.0.bias",
        "head.weight": "to_logits.1.weight",
        "head.bias": "to_logits.1.bias",
    }
    parts = {
        "attn_norm": "0.norm",
        "attn": "0.fn",
        "ff_norm": "1.norm",
        "ff.w1": "1.fn.net.0",
        "ff.w2": "1.fn.net.3",
    }
    for name in model.state_dict():
        if not name.startswith("blocks."):
            continue
        _, index, rest = name.split(".", 2)
        for ours, theirs in sorted(parts.items(), key=lambda kv: -len(kv[0])):
            if rest.startswith(ours + "."):
                mapping[name] = f"layers.{index}.{theirs}{rest[len(ours) :]}"
                break
    copy_weights(model, reference, mapping)


register_converter(MemorizingLM, _convert)
