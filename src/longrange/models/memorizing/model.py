"""``memorizing``: the Memorizing Transformer (Wu, Rabe, Hutchins, Szegedy, ICLR 2022).

A pre-norm decoder read chunk by chunk (``max_seq_len`` tokens per chunk). Every layer attends
causally within the chunk, with one shared key/value head and a T5 relative position bias,
plus optional XL memories: the keys and values of the last ``xl_max_memories`` positions
(``memory/xl.py``). The memorizing layers also retrieve, for every query and head, the top-k
(key, value) pairs from a kNN memory of everything the layer has seen earlier in the document
(``longrange.memory.knn``), and take one softmax over retrieved and local keys (the
reference's way), or with ``knn_combine="gate"`` a softmax over each, mixed per head by a
learned sigmoid gate (the paper's way: the model can turn away from stale memories early on).
Their attention is cosine attention: unit-norm queries and keys times a learned per-head
temperature. Optionally the output passes a tanh gate (Flamingo style), and ``shift_tokens``
feeds every attention half of its input features from the previous position (a cheap aid to
copying: content-based lookups form much sooner). ``xl_reproject`` keeps the XL window as
layer inputs projected with the current weights each chunk (Transformer-XL) rather than as the
keys/values of the step that made them.

Order of a chunk: search the memory with the chunk's queries, attend, and only when the
chunk is done add its keys and values to the memory (entries that leave the XL window, when
the layer has one), so a chunk never retrieves itself and the memory only ever holds the past.
The memory is per batch row: the trainer resets the rows that start a new document; tokens
``clear_memories_on_sos_token_id`` / ``..._eos_...`` mark document starts inside a chunk: the
queries from that point on retrieve nothing, and after the chunk the row's memory is cleared
and refilled with the new document's entries only (causal, unlike the reference, which
cleared the whole row before the chunk whenever the token occurred anywhere in it).

The chunks are the segments of the segment flow (``models/flow.py``): a forward call commits
its chunk at its end; decoding keeps the current chunk open until it holds ``max_seq_len``
tokens and then commits it exactly as a forward does, so generation equals a chunked forward
over the same tokens. ``chunk.py`` runs a chunk's pieces and commits them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from longrange.memory.knn import KNNMemoryList
from longrange.memory.knn.scratch import ScratchMemory
from longrange.memory.knn.store import make_memory_directory
from longrange.memory.xl import XLMemoryManager
from longrange.models.flow import Piece, SegmentedLM
from longrange.models.memorizing.chunk import commit_chunk, empty_chunk, run_piece
from longrange.models.memorizing.config import MemorizingConfig
from longrange.models.memorizing.layers import MemorizingBlock
from longrange.models.state import State, state_files
from longrange.modules.init import init_residual_stack
from longrange.modules.positional import T5RelativePositionBias

state_files(KNNMemoryList.open_saved)(KNNMemoryList)


def rotated(layers: tuple[int, ...], shift: int) -> dict[int, int]:
    """Layer index -> the position in ``layers`` (1-based numbers) whose memory it uses when
    memories are rotated down by ``shift`` (the reference's memory shift)."""
    count = len(layers)
    return {layer - 1: (j + shift) % count for j, layer in enumerate(layers)} if count else {}


class MemorizingLM(SegmentedLM):
    """Memorizing Transformer LM: ``forward_lm(tokens, mask=None, state=None)``; tokens longer
    than ``max_seq_len`` run chunk by chunk through the state (a temporary one when None)."""

    config_class = MemorizingConfig
    flush_at_call_end = True
    # ``longrange bench speed`` feeds long inputs chunk by chunk (fwd+bwd per chunk) through
    # the state, as training does, instead of one call over the whole length.
    bench_feeds_chunks = True

    def __init__(self, config: MemorizingConfig) -> None:
        super().__init__(config)
        c = config
        self.knn_layers = c.knn_layer_numbers
        self.xl_layers = c.xl_layer_numbers
        # layer index -> the memorizing layer's kNN memory (index in the list) / the layer whose
        # XL window it reads (index of the layer)
        self.knn_source = rotated(self.knn_layers, c.shift_knn_memories_down)
        self.xl_source = {
            i: self.xl_layers[j] - 1 for i, j in rotated(self.xl_layers, c.shift_xl_memories_down).items()
        }
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        bias_kwargs = dict(
            causal=True,
            scale=c.head_width**0.5,
            num_buckets=c.rel_pos_num_buckets,
            max_distance=c.rel_pos_max_distance,
        )
        self.rel_pos = T5RelativePositionBias(heads=c.heads, **bias_kwargs)
        self.knn_rel_pos = T5RelativePositionBias(heads=c.knn_attn_heads or c.heads, **bias_kwargs)
        self.blocks = nn.ModuleList(MemorizingBlock(c, layer) for layer in range(1, c.depth + 1))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)
        # The XL windows' FIFO (no weights); None without XL layers.
        self.xl_memory = None
        if self.xl_layers:
            self.xl_memory = XLMemoryManager(
                c.head_width, layers=len(self.xl_layers), mem_length=c.xl_max_memories
            )
        outputs = [linear for block in self.blocks for linear in (block.attn.to_out, block.ff.w2)]
        init_residual_stack(self, outputs, c.depth)

    # --- memories -------------------------------------------------------------------------
    def create_knn_memories(
        self, *, batch_size: int, device: torch.device | str | None = None
    ) -> KNNMemoryList:
        """One kNN memory of ``batch_size`` rows per memorizing layer, in a fresh directory
        under ``knn_memories_directory`` (or the system temp) that holds an ``OWNER`` file
        with this process's id; ``cleanup`` removes it."""
        c = self.config
        if not self.knn_layers:
            return KNNMemoryList()
        directory = make_memory_directory(c.knn_memories_directory)
        device = torch.device(device) if device is not None else self.embed.weight.device
        return KNNMemoryList.create_memories(
            batch_size=batch_size, num_memory_layers=len(self.knn_layers), memories_directory=directory
        )(
            dim=c.head_width,
            max_memories=c.max_knn_memories,
            multiprocessing=c.knn_memory_multiprocessing,
            backend=c.knn_backend,
            index=c.knn_index,
            device=device,
            remove_directory=True,
        )

    @contextmanager
    def knn_memories_context(self, **kwargs):
        """``with model.knn_memories_context(batch_size=B) as memories:`` ... files removed after."""
        memories = self.create_knn_memories(**kwargs)
        try:
            yield memories
        finally:
            memories.cleanup()

    # --- the state (chunk.py describes the entries) ----------------------------------------------
    def segment_length(self) -> int:
        return self.config.max_seq_len

    def fresh_state(
        self, batch_size: int, device: torch.device | str | None = None, *, memories: bool = True
    ) -> State:
        """A state for a new sequence; without ``memories`` a scratch state (no kNN memory,
        nothing committed) for a call that keeps nothing."""
        knn = self.create_knn_memories(batch_size=batch_size, device=device) if memories else None
        device = self.embed.weight.device if device is None else torch.device(device)
        state = State.empty(
            batch_size, self.config.depth, knn=knn, xl_mask=None, open_length=0, shift_keep=None
        )
        for i, layer in enumerate(state.layers):
            layer.update(open=None, open_inputs=None, xl_kv=None, shift=None)
            if i in self.xl_source:
                layer["xl"] = None
        state.shared["doc_started"] = torch.zeros(batch_size, dtype=torch.bool, device=device)
        empty_chunk(state)
        return state

    def call_state(self, batch_size: int, length: int, device: torch.device) -> tuple[State, bool]:
        # kNN memory files only when the call spans several chunks; closed after the call. A
        # compiled graph cannot make files: its call's memories are tensors (exact search).
        spans = length > self.config.max_seq_len
        if spans and torch.compiler.is_compiling():
            state = self.fresh_state(batch_size, device, memories=False)
            like = self.embed.weight
            state.shared["knn"] = KNNMemoryList(
                ScratchMemory(batch_size, self.config.head_width, self.config.max_knn_memories, like)
                for _ in self.knn_layers
            )
            return state, False
        return self.fresh_state(batch_size, device, memories=spans), False

    def check_state(self, state, batch: int) -> None:
        super().check_state(state, batch)
        knn = state.shared.get("knn")
        if not isinstance(knn, KNNMemoryList):
            raise ValueError(
                f"this state holds no kNN memories; make it with {type(self).__name__}.init_state"
            )
        if knn and knn.num_indices != batch:
            raise ValueError(
                f"batch size {batch} does not match the kNN memories ({knn.num_indices} rows); "
                f"create them with batch_size={batch}"
            )
        if len(knn) != len(self.knn_layers):
            raise ValueError(
                f"expected {len(self.knn_layers)} kNN memories (one per memorizing layer), got {len(knn)}"
            )
        c = self.config
        for memory in knn:
            if (memory.dim, memory.max_memories) != (c.head_width, c.max_knn_memories):
                raise ValueError(
                    f"the state's kNN memories hold keys of width {memory.dim} and {memory.max_memories} "
                    f"entries per row; this model needs {c.head_width} and max_knn_memories="
                    f"{c.max_knn_memories} (a state of another configuration)"
                )
        # a window: [B, L, dim] inputs with xl_reproject, else [2, B, L, head_width] keys/values
        width, dims = (c.dim, 3) if c.xl_reproject else (c.head_width, 4)
        for i, layer in enumerate(state.layers):
            window = layer.get("xl")
            if ("xl" in layer) != (i in self.xl_source) or (
                window is not None and (window.dim() != dims or window.shape[-1] != width)
            ):
                raise ValueError(
                    f"the state's XL windows do not fit this model's (XL layers "
                    f"{self.xl_layers}, xl_reproject={c.xl_reproject}): a state of another configuration"
                )

    def forget_rows(self, state: State, rows: Tensor) -> None:
        knn, keep = state.shared["knn"], state.shared["shift_keep"]
        if knn:
            knn.clear_memory(rows.nonzero().flatten().tolist())
        if keep is not None:
            state.shared["shift_keep"] = keep & ~rows.to(keep.device)[:, None]

    def run_piece(self, tokens: Tensor, piece: Piece, state: State) -> Tensor:
        return run_piece(self, tokens, piece, state)

    def commit(self, state: State, *, add_knn_memory: bool = True) -> None:
        commit_chunk(self, state, add_knn_memory=add_knn_memory)
