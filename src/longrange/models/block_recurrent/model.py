"""``block_recurrent``: the Block-Recurrent Transformer (Hutchins, Schlag, Wu, Dyer, Neyshabur
2022), after the block-recurrent-transformer-pytorch reference.

The sequence is cut into blocks of ``block_width``; blocks are processed in order, everything
inside a block in parallel. In every layer the block's queries attend, in one fused call, to
[the previous block's keys/values (XL memory, ``memory/xl.py``) ; the block's own], causally
with the mask offset by the memory length. Keys and values have one head shared by all query
heads; positions are rotary with xPos scaling; recurrent layers (or all, with
``all_layers_qk_rmsnorm``) L2-normalise queries and keys with learned gains. A recurrent
layer owns state vectors (``memory/recurrent.py``): the tokens of a block read the states
(at layer ``read_recurrent_layers[i]``) and, once the block is complete, the states are
written from the block's keys/values (at layer ``recurrent_layers[i]``).

Choices (and fixes of the reference's defects):
- The state is carried by the segment flow (``models/flow.py``; docs/ARCHITECTURE.md,
  "Segment flow"): per layer its XL window ``xl`` and its part ``open`` of a block still being
  filled, and for a recurrent layer its ``states`` [B, S, dim] (None: the learned initial
  ones) and ``read``, their prepared form for the open block (derived; dropped on detach);
  shared, the masks ``xl_mask`` / ``open_mask``, the compressed slots ``xl_compressed``.
  A call may end inside a block: the next call continues it, so any split of a sequence
  into segments (and token by token decoding) gives the same result as one call. The write
  happens when a block fills; ``flush`` finishes a partial block on request (writing the
  states *and* pushing its keys/values into the memory), which the reference-named class
  does at the end of a call, so that state and memory always describe the same tokens.
- All blocks of a call run layer by layer, blocks of equal shape batched into one kernel
  call; only a span of layers between a read and a later write of the same states runs
  block by block. Each layer commits its own block (memory push, state write) in that walk.
- A padding mask (True = real token) hides padded keys from the block attention, from the
  state write and, carried inside the XL memory, from later blocks.
- ``segment_carry`` decides what ``forward_lm`` keeps from the state it is given: "all",
  "xl_memory" (recurrent states reset each segment), or "none" (a fresh start each segment).
- Long training calls (more than ``recompute_segment`` tokens with gradients on) run in
  segments of whole blocks, each under activation checkpointing: the forward pass keeps only
  what crosses a segment boundary (XL windows, open block, recurrent states), the backward
  pass re-runs one segment at a time. About 90 KB of activations per token would otherwise
  stay alive until the backward pass (6 GB at 64K tokens); the price is one more forward pass.
  The fused attention kernels' outputs (and their log-sum-exp) are kept from the first pass
  instead (1 KB per token and layer at the bench size): the re-run takes them instead of
  calling the kernel again, which was a third of what it cost. In eager mode on the CPU they
  are recorded at the call (``ops.blockrec.kept_kernel_contexts``); compiled graphs and other
  devices use a selective-checkpoint policy (:func:`keep_attention`).

Dimensions: B batch, N tokens, W block width, H heads, D head width, M memory positions,
K = M + W keys of a block, S state vectors.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longrange.memory.recurrent import ReadCache, StateContainer, StateTrack, merge_heads, split_heads
from longrange.memory.xl import XLMemory, XLMemoryManager, XLStream
from longrange.models.block_recurrent.config import BlockRecurrentConfig
from longrange.models.block_recurrent.layers import BlockRecurrentLayer, feed_forward, join, rotate
from longrange.models.flow import Piece, SegmentedLM
from longrange.models.state import State, state_entry
from longrange.modules.norms import LayerNorm
from longrange.modules.rotary import RotaryEmbedding
from longrange.ops.blockrec import kept_kernel_contexts, shared_kv_attention
from longrange.ops.dense import cpu_flash_supported

state_entry(ReadCache)

_aten = torch.ops.aten
# the fused attention kernels whose outputs a recomputed segment keeps (module docstring)
KEPT_OPS = frozenset(
    {
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    }
)


# Eager CPU segments keep the kernels' outputs at the call (ops.blockrec.sdpa) instead of
# through the policy below, whose dispatch mode hooks every operator of both passes. Bench
# preset, steps in turn: 16K 1.046x, 32K 1.023x, 64K 0.998x (6 rounds in both orders; the
# rounds spread 0.91-1.09), the same peak. A list, so that tests can switch it.
KEEP_AT_CALL = [True]


def keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The recomputation policy of a segment: keep what :data:`KEPT_OPS` return, form the
    rest again."""
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _rebased(tokens: Tensor, mask: Tensor | None, group: list[Piece]):
    """The tokens, mask and pieces of a run of consecutive pieces, numbered from its start."""
    first, last = group[0], group[-1]
    pieces = [
        dataclasses.replace(p, index=i, start=p.start - first.start, stop=p.stop - first.start)
        for i, p in enumerate(group)
    ]
    seg_mask = None if mask is None else mask[:, first.start : last.stop]
    return tokens[:, first.start : last.stop], seg_mask, pieces


class BlockRecurrentLM(SegmentedLM):
    """Block-recurrent decoder: ``forward_lm(tokens [B, N], mask=None, state=None)`` ->
    logits [B, N, V] and the state to continue from."""

    config_class = BlockRecurrentConfig
    derived_entries = ("read",)

    def __init__(self, config: BlockRecurrentConfig) -> None:
        super().__init__(config)
        c = config
        pairs = sorted(zip(c.write_layers(), c.read_layers(), strict=True))
        # Containers are numbered in layer order; readers[i] lists the containers read at
        # layer i (0-based), writer[i] the one written there.
        self.writer = {w - 1: j for j, (w, _) in enumerate(pairs)}
        self.readers = {i: [j for j, (_, r) in enumerate(pairs) if r - 1 == i] for i in range(c.depth)}
        # Layers between a read and a later write of the same states must run block by block;
        # every other layer runs over all blocks of a call at once.
        linked = [False] * c.depth
        for w, r in pairs:
            for i in range(r - 1, w - 1):
                linked[i] = True
        self.spans, first = [], 0
        for i in range(c.depth):
            if not linked[i]:
                self.spans.append((first, i))
                first = i + 1
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            BlockRecurrentLayer(
                c,
                qk_rmsnorm=c.all_layers_qk_rmsnorm or i in self.writer,
                reads=len(self.readers[i]),
                recurrent=i in self.writer,
            )
            for i in range(c.depth)
        )
        w = c.block_width
        self.memory = XLMemoryManager(
            c.dim_head,
            layers=c.depth,
            mem_length=w,
            compress_factor=c.compressed_mem_factor if c.use_compressed_mem else 1,
            compressed_length=w // 2,
        )
        self.rotary = RotaryEmbedding(c.dim_head, theta=c.rotary_theta, xpos_scale_base=c.xpos_scale_base)
        # Rotary positions as in the reference: keys right-aligned in a window of 2 (3 with
        # compressed memory) blocks, xPos powers centred on the window's middle.
        self.window = (3 if c.use_compressed_mem else 2) * w
        self.norm = LayerNorm(c.dim, bias=False)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        depth = self.config.depth
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            # Residual projections shrink with depth so the residual stream starts near unit scale.
            nn.init.normal_(layer.to_out.weight, std=0.02 / (2 * depth) ** 0.5)
            nn.init.normal_(layer.ff.w2.weight, std=0.02 / (2 * depth) ** 0.5)
            box = layer.state_container
            if box is not None:
                gate = box.state_out_to_gate if box.gate_type == "fixed" else box.lstm_gate
                nn.init.normal_(gate.weight, std=self.config.dim**-0.5)

    @property
    def containers(self) -> list[StateContainer]:
        return [self.layers[i].state_container for i in sorted(self.writer)]

    # --- the state ------------------------------------------------------------------------------
    def segment_length(self) -> int:
        return self.config.block_width

    def fresh_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        like = self.embed.weight if device is None else self.embed.weight.new_empty(0, device=device)
        empty = like.new_zeros(2, batch_size, 0, self.config.dim_head)
        state = State.empty(
            batch_size, self.config.depth, xl_mask=None, xl_compressed=0, open_mask=None, open_length=0
        )
        for i, layer in enumerate(state.layers):
            layer["xl"], layer["open"] = empty, empty
            if i in self.writer:
                layer["states"] = None
        return state

    def windows(self, state: State) -> tuple[XLMemory, XLMemory]:
        """The state's XL memory and open block, every layer's entries together."""
        shared = state.shared
        memory = XLMemory([layer["xl"] for layer in state.layers], shared["xl_mask"], shared["xl_compressed"])
        return memory, XLMemory([layer["open"] for layer in state.layers], shared["open_mask"])

    def store_windows(self, state: State, memory: XLMemory, pending: XLMemory) -> None:
        for layer, kv, open_kv in zip(state.layers, memory.entries, pending.entries, strict=True):
            layer["xl"], layer["open"] = kv, open_kv
        state.shared.update(xl_mask=memory.mask, xl_compressed=memory.compressed, open_mask=pending.mask)

    def carry(self, state: State) -> None:
        carry = self.config.segment_carry
        if carry == "none":
            fresh = self.fresh_state(state.batch_size, state.layers[0]["xl"].device)
            state.layers[:], state.position = fresh.layers, 0
            state.shared.update(fresh.shared)
        elif carry == "xl_memory":
            for i in self.writer:
                state.layers[i]["states"] = None
                state.layers[i].pop("read", None)

    def forget_rows(self, state: State, rows: Tensor) -> None:
        for i, j in self.writer.items():
            states = state.layers[i]["states"]
            if states is not None:
                keep = ~rows.to(states.device)[:, None, None]
                state.layers[i]["states"] = torch.where(keep, states, self.containers[j].initial(len(rows)))

    def commit(self, state: State, **options) -> None:
        """Finish the open block: write the states from its keys/values and push them into the
        XL memory (what a complete block does inside :meth:`run`)."""
        memory, pending = self.windows(state)
        for i, j in self.writer.items():
            layer, box = state.layers[i], self.containers[j]
            cache = layer.pop("read", None) or box.prepare(layer["states"], state.batch_size)
            kv = pending.entries[i]
            layer["states"] = box.write(cache, kv[0], kv[1], pending.mask)
        memory, _ = self.memory.push(memory, pending.entries, pending.mask)
        empty = pending.entries[0][..., :0, :]
        self.store_windows(state, memory, XLMemory([empty] * self.config.depth))

    # --- the blocks -----------------------------------------------------------------------------
    def run(
        self, tokens: Tensor, mask: Tensor | None, pieces: list[Piece], state: State, **options
    ) -> Tensor:
        """Logits of the call's pieces; a long training call runs in recomputed segments."""
        size = self.config.recompute_segment
        if not (size and torch.is_grad_enabled() and tokens.shape[1] > size):
            return self.run_pieces(tokens, mask, pieces, state)
        outs, group = [], []
        for piece in pieces:
            if group and piece.stop - group[0].start > size:
                outs.append(self._run_recomputed(tokens, mask, group, state))
                group = []
            group.append(piece)
        # The last segment keeps its activations: its backward pass comes first, and frees
        # them before any other segment is recomputed, so the peak stays one segment's.
        outs.append(self.run_pieces(*_rebased(tokens, mask, group), state))
        return torch.cat(outs, dim=1)

    def _run_recomputed(
        self, tokens: Tensor, mask: Tensor | None, group: list[Piece], state: State
    ) -> Tensor:
        """The pieces of ``group`` under activation checkpointing: a function of the state's
        boundary entries (read here, replaced by the segment's) and the segment's tokens."""
        seg_tokens, seg_mask, pieces = _rebased(tokens, mask, group)
        logits, boundary = checkpoint(
            self._segment,
            seg_tokens,
            seg_mask,
            pieces,
            self._boundary(state),
            use_reentrant=False,
            context_fn=self._keeping(),
        )
        self._restore(state, boundary)
        return logits

    def _keeping(self):
        """How a recomputed segment keeps the attention kernels' outputs: recorded at the call
        (``kept_kernel_contexts``) in eager mode on the CPU, else a selective-checkpoint policy
        (compiled graphs trace it; the GPU kernels have other signatures)."""
        if not torch.compiler.is_compiling() and KEEP_AT_CALL[0] and cpu_flash_supported(self.embed.weight):
            return kept_kernel_contexts
        return functools.partial(create_selective_checkpoint_contexts, keep_attention)

    def _segment(self, tokens: Tensor, mask: Tensor | None, pieces: list[Piece], boundary: dict):
        state = State(tokens.shape[0], [{} for _ in range(self.config.depth)])
        self._restore(state, boundary)
        logits = self.run_pieces(tokens, mask, pieces, state)
        return logits, self._boundary(state)

    def _boundary(self, state: State) -> dict:
        """The entries a segment reads from the state (and writes back)."""
        names = ("xl", "open", "states", "read")
        return {
            "layers": [{k: layer[k] for k in names if k in layer} for layer in state.layers],
            "shared": {k: state.shared[k] for k in ("xl_mask", "xl_compressed", "open_mask")},
        }

    def _restore(self, state: State, boundary: dict) -> None:
        for layer, saved in zip(state.layers, boundary["layers"], strict=True):
            layer.pop("read", None)
            layer.update(saved)
        state.shared.update(boundary["shared"])

    def run_pieces(self, tokens: Tensor, mask: Tensor | None, pieces: list[Piece], state: State) -> Tensor:
        """Layer by layer over all the pieces at once, except inside a span of layers
        between a read and a later write of the same states, which runs piece by piece; each
        layer commits its own blocks as pieces complete them (no commit options)."""
        batch = tokens.shape[0]
        memory, pending = self.windows(state)
        streams = [
            XLStream(self.memory, i, memory.layer(i), pending.layer(i)) for i in range(self.config.depth)
        ]
        writers = sorted(self.writer)
        tracks = [
            StateTrack(box, state.layers[i]["states"], state.layers[i].get("read"), batch)
            for i, box in zip(writers, self.containers, strict=True)
        ]
        x, tables = self.embed(tokens), {}
        for first, last in self.spans:
            if first == last:
                x = self._layer(first, x, pieces, streams, tracks, tables)
                continue
            outs = []
            for piece, y in zip(pieces, x.split([p.width for p in pieces], dim=1)):
                for i in range(first, last + 1):
                    y = self._layer(i, y, [piece], streams, tracks, tables)
                outs.append(y)
            x = join(outs, 1)
        self.store_windows(
            state,
            XLMemory(
                [s.memory.entries[0] for s in streams], streams[0].memory.mask, streams[0].memory.compressed
            ),
            XLMemory([s.pending.entries[0] for s in streams], streams[0].pending.mask),
        )
        for i, track in zip(writers, tracks, strict=True):
            state.layers[i]["states"] = track.states[-1]
            cache = track.caches.get(len(pieces))  # the open block's, when the call ends inside one
            if cache is None:
                state.layers[i].pop("read", None)
            else:
                state.layers[i]["read"] = cache
        return self.head(self.norm(x))

    def _rotary_tables(self, keys: int, queries: int, tables: dict, dtype: torch.dtype) -> tuple[Tensor, ...]:
        # a compiled call builds them where used: hashing a symbolic key count would fix the
        # graph to one count (the compiler merges the repeats)
        if torch.compiler.is_compiling():
            built = self._build_rotary_tables(keys)
        else:
            if keys not in tables:
                tables[keys] = self._build_rotary_tables(keys)
            built = tables[keys]
        q_cos, q_sin, k_cos, k_sin = (t.to(dtype) for t in built)
        return q_cos[keys - queries :], q_sin[keys - queries :], k_cos, k_sin

    def _build_rotary_tables(self, keys: int) -> tuple[Tensor, ...]:
        pos = torch.arange(keys, device=self.embed.weight.device, dtype=torch.float32)
        pos = pos + (self.window - keys)
        angles = self.rotary.angles(pos)
        scale = self.rotary.xpos_scale(pos - self.window // 2)
        cos, sin = angles.cos(), angles.sin()
        return cos * scale, sin * scale, cos / scale, sin / scale

    def _layer(
        self,
        i: int,
        x: Tensor,
        pieces: list[Piece],
        streams: list[XLStream],
        tracks: list[StateTrack],
        tables: dict,
    ) -> Tensor:
        """Layer i over x [B, n, dim], the positions of ``pieces`` in order."""
        layer, c = self.layers[i], self.config
        batch, n = x.shape[:2]
        h = layer.norm(x)
        q = split_heads(layer.to_q(h), c.heads)
        kv = layer.to_kv(h).view(batch, n, 2, -1).permute(2, 0, 1, 3)  # [2, B, n, D]
        # split (not slicing) keeps the backward pass linear in the number of pieces.
        sizes = [piece.width for piece in pieces]
        q_parts, kv_parts = q.split(sizes, dim=2), kv.split(sizes, dim=2)
        groups: dict[tuple, list] = {}
        for k, piece in enumerate(pieces):
            keys, key_mask, block = streams[i].take(kv_parts[k], piece.mask, piece.finish)
            if i in self.writer:
                tracks[self.writer[i]].advance(piece.index, piece.finish, block.entries[0], block.mask)
            # a lone piece (a decoding step) needs no group, and a compiled step's sizes are
            # symbols, which hashing would fix to one value
            shape = k if len(pieces) == 1 else (sizes[k], keys.shape[-2])
            groups.setdefault((shape, key_mask is not None), []).append((k, keys, key_mask))
        outs: list[Tensor | None] = [None] * len(pieces)
        # Pieces of equal shape run as one batch: the kernels are much faster on many blocks.
        for (_, masked), members in groups.items():
            width = sizes[members[0][0]]
            qg = join([q_parts[k] for k, _, _ in members], 0)
            keys, values = join([kv for _, kv, _ in members], 1)
            mg = join([m for _, _, m in members], 0) if masked else None
            if layer.qk_norm is not None:
                qg, keys = layer.qk_norm(qg, keys)
            q_cos, q_sin, k_cos, k_sin = self._rotary_tables(keys.shape[-2], width, tables, qg.dtype)
            qg, keys = rotate(qg, q_cos, q_sin), rotate(keys, k_cos, k_sin)
            out = shared_kv_attention(
                qg, keys, values, key_mask=mg, causal=True, scale=layer.scale, backend=c.attn_backend
            )
            for (k, _, _), piece in zip(members, out.split(batch)):
                outs[k] = piece
        reads = [merge_heads(join(outs, 2))]
        h_parts = h.split(sizes, dim=1)
        for j in self.readers[i]:
            reads.append(self._read(j, h_parts, pieces, tracks[j]))
        x = x + layer.to_out(join(reads, -1))
        return x + feed_forward(layer.ff, layer.ff_norm(x))

    def _read(self, j: int, h_parts: tuple[Tensor, ...], pieces: list[Piece], track: StateTrack) -> Tensor:
        """Container j read by the tokens h [B, n_k, dim] of each piece, from the states at the
        piece's block start; pieces of equal width in one batch -> [B, n, H*D]."""
        box, batch = self.containers[j], h_parts[0].shape[0]
        groups: dict[int, list[int]] = {}
        for k, part in enumerate(h_parts):
            groups.setdefault(part.shape[1], []).append(k)
        outs: list[Tensor | None] = [None] * len(pieces)
        for members in groups.values():
            caches = [track.cache(pieces[k].index) for k in members]
            k_states = join([cache.k for cache in caches], 0)
            v_states = join([cache.v for cache in caches], 0)
            hg = join([h_parts[k] for k in members], 0)
            out = box.read(hg, ReadCache(k_states, k_states, k_states, v_states))
            for k, piece in zip(members, out.split(batch)):
                outs[k] = piece
        return join(outs, 1)
