"""memorizing-transformers-pytorch compatibility: ``MemorizingTransformer``.

``MemorizingTransformer(num_tokens=, dim=, depth=, ...)`` takes the reference's keywords and
defaults and keeps its calling convention::

    with model.knn_memories_context(batch_size=B) as knn_memories:
        logits = model(x, knn_memories)                          # one chunk, memories updated
        loss, xl = model(x, knn_memories, xl_memories=xl, labels=y)  # with XL layers

XL memories go in and out as the reference's [B, L, 2, D] per XL layer ([B, L, dim] with
``xl_reproject``). Behaviour that differs from the reference, on purpose: clearing on sos /
eos token ids works (per batch row, at the token's position; see ``chunk.py``); the relative
position bias stays aligned when XL memories make the keys longer than the queries (the
reference shifted every layer's bias by the XL length); the memory keeps keys and values
matched when it wraps around. ``memorizing_layers`` / ``xl_memory_layers`` outside
[1, depth] raise instead of being dropped silently. The weights start as the reference's do
(PyTorch's defaults: the token embedding from N(0, 1)); ``MemorizingLM`` keeps the family's
own GPT-2-style initialisation.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from longrange.memory.knn import KNNMemoryList
from longrange.models.keywords import KeywordTable
from longrange.models.memorizing.config import MemorizingConfig
from longrange.models.memorizing.model import MemorizingLM
from longrange.models.reference_init import reset_torch_defaults
from longrange.models.state import State

_REFERENCE = dict(
    dim_head=64,
    heads=8,
    knn_attn_heads=None,
    attn_dropout=0.0,
    ff_mult=4,
    ff_dropout=0.0,
    memorizing_layers=None,
    max_knn_memories=250000,
    num_retrieved_memories=32,
    clear_memories_on_sos_token_id=None,
    clear_memories_on_eos_token_id=None,
    knn_memories_directory=None,
    shift_knn_memories_down=0,
    pad_id=0,
    xl_max_memories=0,
    xl_memory_layers=None,
    shift_xl_memories_down=0,
    knn_memory_multiprocessing=False,
    max_seq_len=65536,  # not the reference's: the chunk length of forward_lm / generate
)
KEYWORDS = KeywordTable.for_config(
    "MemorizingTransformer",
    _REFERENCE,
    MemorizingConfig,
    required=("num_tokens", "dim", "depth"),
    renames={"num_tokens": "vocab_size"},
)


def _whole(name: str, value) -> int:
    """The reference types some integer keywords as floats (``shift_*_memories_down = 0.``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


def _layers(name: str, value) -> tuple[int, ...]:
    layers = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(dict.fromkeys(_whole(name, v) for v in layers))


def config_from_keywords(keywords: dict[str, Any]) -> MemorizingConfig:
    """The config of the reference's keywords (its conventions turned into ours)."""
    fields = KEYWORDS.parse(keywords)
    if fields["memorizing_layers"] is None:
        # The reference's default (depth // 2,) is dropped for depth 1: no memorizing layer.
        depth = fields["depth"]
        fields["memorizing_layers"] = (depth // 2,) if depth // 2 >= 1 else ()
    for name in ("memorizing_layers", "xl_memory_layers"):
        if fields[name] is not None:
            fields[name] = _layers(name, fields[name])
    for name in ("shift_knn_memories_down", "shift_xl_memories_down", "xl_max_memories"):
        fields[name] = _whole(name, fields[name])
    if fields["knn_memories_directory"] is not None:
        fields["knn_memories_directory"] = str(fields["knn_memories_directory"])
    return MemorizingConfig(**fields)


class MemorizingTransformer(MemorizingLM):
    """The reference's ``MemorizingTransformer``; also accepts a :class:`MemorizingConfig`.

    Extra keywords beyond the reference's map straight onto the config (``max_seq_len``:
    the chunk length used by ``forward_lm`` / ``generate``; ``knn_backend``, ``knn_index``,
    ``knn_gate_output``, ``attn_scale_init``, ...).
    """

    def __init__(self, config: MemorizingConfig | None = None, **keywords: Any) -> None:
        if config is None:
            config = config_from_keywords(keywords)
        elif keywords:
            raise ValueError("pass either a MemorizingConfig or keywords, not both")
        super().__init__(config)
        # the reference leaves every layer at PyTorch's defaults (models/reference_init.py)
        reset_torch_defaults(self)

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
        state = self._state_of(x.shape[0], x.device, knn_memories, xl_memories)
        logits = self.advance(x, None, state, add_knn_memory=add_knn_memory)
        self.flush(state, add_knn_memory=add_knn_memory)
        new_xl = None
        if self.xl_layers:
            windows = [state.layers[layer - 1]["xl"] for layer in self.xl_layers]
            new_xl = [t if self.config.xl_reproject else t.permute(1, 2, 0, 3) for t in windows]
        if labels is None:
            return logits if new_xl is None else (logits, new_xl)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.config.pad_id)
        return loss if new_xl is None else (loss, new_xl)

    def _state_of(self, batch: int, device, knn_memories: Any, xl_memories: Any) -> State:
        """A state holding the reference's memory list and XL memories, checked."""
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
        state = self.fresh_state(batch, device, memories=False)
        state.shared["knn"] = KNNMemoryList(knn_memories)
        if xl_memories is None or not len(xl_memories) or not self.xl_layers:
            return state
        if len(xl_memories) != len(self.xl_layers):
            raise ValueError(f"xl_memories must hold {len(self.xl_layers)} tensors, got {len(xl_memories)}")
        # keys/values [B, L, 2, D], or with xl_reproject the layer inputs [B, L, dim]
        entry = (self.config.dim,) if self.config.xl_reproject else (2, self.config.head_width)
        for layer, t in zip(self.xl_layers, xl_memories, strict=True):
            if t.dim() != 2 + len(entry) or t.shape[0] != batch or tuple(t.shape[2:]) != entry:
                raise ValueError(
                    f"each XL memory must have shape ({batch}, L, {', '.join(map(str, entry))}), "
                    f"got {tuple(t.shape)}"
                )
            state.layers[layer - 1]["xl"] = t if self.config.xl_reproject else t.permute(2, 0, 1, 3)
        return state
