"""The cache transformers' ``generate`` carries between calls: a holder of the longrange State.

Every family decodes through one :class:`~longrange.models.state.State` (KV caches, running
sums, recurrent states, XL windows, kNN memories: docs/ARCHITECTURE.md, "State"), built by
``prefill`` and advanced by ``step``. :class:`LongRangeCache` only holds it, so decoding under
``generate`` costs what the family's own ``step`` costs (O(1) per token where the family has
incremental state), and a stateful family's memories live in the cache for as long as it does.

The cache does not know the model; :class:`~longrange.hf.modeling.LongRangeForCausalLM` runs
the calls (``prefill`` on the first, then on the new tokens only) and, for a bounded context,
keeps the last ``context_limit()`` tokens here so that it can restart from the most recent
half window when the state is full, as longrange's own decoding loop does.

What a longrange state cannot do is refused with a ValueError that says so: reordering or
repeating batch rows (beam search, contrastive search) and cropping (assisted decoding), since
a state holds entries that are not per-row tensors (kNN memory files, running positions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from longrange.models.state import State

UNSUPPORTED = (
    "a longrange decoding state cannot {what} (it holds entries that are not per-row tensors, "
    "such as kNN memory files); use greedy or sampled generation with num_beams=1"
)


class LongRangeCache(Cache):
    """Holds the :class:`State` of one decoding run (None until the first call).

    ``seen``: tokens fed so far (what transformers calls the sequence length of the cache);
    ``recent``: the last tokens fed, kept only for a model with a bounded context.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.state: State | None = None
        self.seen = 0
        self.recent: Tensor | None = None

    def __repr__(self) -> str:
        position = None if self.state is None else self.state.position
        return f"LongRangeCache(seen={self.seen}, state_position={position})"

    # --- what the model updates -------------------------------------------------------------
    def remember(self, tokens: Tensor, limit: int | None) -> None:
        """Count ``tokens`` [B, n] as fed; keep the last ``limit`` of all tokens fed."""
        self.seen += tokens.shape[1]
        if limit is None:
            return
        recent = tokens if self.recent is None else torch.cat([self.recent, tokens], dim=1)
        self.recent = recent[:, -limit:]

    def replace_state(self, state: State) -> None:
        """Put a new state in (after a window restart), releasing the old one."""
        if self.state is not None and self.state is not state:
            self.state.close()
        self.state = state

    def close(self) -> None:
        """Release what the state holds outside Python (kNN memory files)."""
        if self.state is not None:
            self.state.close()
        self.state, self.seen, self.recent = None, 0, None

    # --- what transformers reads ------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a bounded context restarts from its last half window; no hard maximum

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.close()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(UNSUPPORTED.format(what="drop decoded tokens (assisted decoding)"))

    def reorder_cache(self, beam_idx: Any) -> None:
        raise ValueError(UNSUPPORTED.format(what="reorder its batch rows (beam search)"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError(UNSUPPORTED.format(what="repeat its batch rows"))

    def batch_select_indices(self, indices: Any) -> None:
        raise ValueError(UNSUPPORTED.format(what="select batch rows"))

    def activate_past_recording(self, **kwargs: Any) -> None:
        raise ValueError(UNSUPPORTED.format(what="record past states to roll back (assisted decoding)"))

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        raise ValueError(UNSUPPORTED.format(what="be offloaded layer by layer"))
