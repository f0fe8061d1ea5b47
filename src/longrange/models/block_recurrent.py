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
- The state carried across calls (:class:`BlockRecurrentState`) holds the XL memory, the
  keys/values of a block still being filled, and the states. A call may end inside a block:
  the next call continues that block, so any split of a sequence into segments (and token
  by token decoding) gives the same result as one call. The write happens when a block
  fills; :meth:`BlockRecurrentLM.flush` finishes a partial block on request (writing the
  states *and* pushing its keys/values into the memory), which the reference-named class
  does at the end of a call, so that state and memory always describe the same tokens.
- A padding mask (True = real token) hides padded keys from the block attention, from the
  state write and, carried inside the XL memory, from later blocks.
- Decoding is incremental: a new token attends to the memory, its block so far and the
  states; nothing is re-run.
- ``segment_carry`` decides what ``forward_lm`` keeps from the state it is given: "all",
  "xl_memory" (recurrent states reset each segment), or "none" (a fresh start each segment);
  the last two are baselines for measuring what the recurrence buys.

Dimensions: B batch, N tokens, W block width, H heads, D head width, M memory positions,
K = M + W keys of a block, S state vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.memory.recurrent import (
    QKNorm,
    ReadCache,
    StateContainer,
    StateTrack,
    merge_heads,
    split_heads,
)
from longrange.memory.xl import XLMemory, XLMemoryManager, XLStream
from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.config import ModelConfig
from longrange.models.registry import register_family
from longrange.modules.feedforward import GEGLUFeedForward
from longrange.modules.norms import LayerNorm
from longrange.modules.rotary import RotaryEmbedding, rotate_half
from longrange.ops.blockrec import shared_kv_attention


@dataclass(kw_only=True)
class BlockRecurrentConfig(ModelConfig):
    family = "block_recurrent"

    dim_head: int = 64
    ff_mult: float = 4.0
    block_width: int = 512
    num_state_vectors: int | None = None  # block_width when None
    recurrent_layers: tuple[int, ...] | None = None  # 1-based; (max(1, depth // 2),) when None
    read_recurrent_layers: tuple[int, ...] | None = None  # recurrent_layers when None
    all_layers_qk_rmsnorm: bool = False
    qk_rmsnorm_scale: float = 8.0
    use_compressed_mem: bool = False
    compressed_mem_factor: int = 4
    xpos_scale_base: float = 512.0
    rotary_theta: float = 10000.0
    gate_type: Literal["fixed", "lstm"] = "fixed"
    segment_carry: Literal["all", "xl_memory", "none"] = "all"
    ignore_index: int = -100
    attn_backend: Literal["sdpa", "naive"] = "sdpa"

    def write_layers(self) -> tuple[int, ...]:
        return self.recurrent_layers if self.recurrent_layers is not None else (max(1, self.depth // 2),)

    def read_layers(self) -> tuple[int, ...]:
        return self.read_recurrent_layers if self.read_recurrent_layers is not None else self.write_layers()

    def state_vectors(self) -> int:
        return self.num_state_vectors if self.num_state_vectors is not None else self.block_width

    def validate(self) -> None:
        super().validate()
        for name in ("dim_head", "block_width", "compressed_mem_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary positions), got {self.dim_head}")
        if self.max_seq_len % self.block_width:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be divisible by block_width ({self.block_width})"
            )
        if self.num_state_vectors is not None and self.num_state_vectors <= 0:
            raise ValueError(f"num_state_vectors must be positive, got {self.num_state_vectors}")
        if self.ff_mult <= 0:
            raise ValueError(f"ff_mult must be positive, got {self.ff_mult}")
        writes, reads = self.write_layers(), self.read_layers()
        if not writes:
            raise ValueError("recurrent_layers must name at least one layer")
        for name, layers in (("recurrent_layers", writes), ("read_recurrent_layers", reads)):
            if not all(isinstance(i, int) and 0 < i <= self.depth for i in layers):
                raise ValueError(f"{name} must range from 1 to the depth {self.depth}, got {layers}")
        if len(set(writes)) != len(writes):
            raise ValueError(f"recurrent_layers must be unique, got {writes}")
        if len(reads) != len(writes):
            raise ValueError(
                f"read_recurrent_layers {reads} must have one entry per recurrent layer {writes}"
            )
        if any(r > w for r, w in zip(reads, writes, strict=True)):
            raise ValueError(
                f"each read layer must be <= its write layer; got read {reads} for write {writes}"
            )
        if self.use_compressed_mem and (self.compressed_mem_factor < 2 or self.block_width < 2):
            raise ValueError("use_compressed_mem needs compressed_mem_factor >= 2 and block_width >= 2")
        choices = {
            "gate_type": ("fixed", "lstm"),
            "segment_carry": ("all", "xl_memory", "none"),
            "attn_backend": ("sdpa", "naive"),
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")


def block_recurrent_tiny() -> BlockRecurrentConfig:
    return BlockRecurrentConfig(
        dim=64, depth=2, heads=2, dim_head=32, block_width=32, num_state_vectors=16, max_seq_len=128
    )


def block_recurrent_small() -> BlockRecurrentConfig:
    return BlockRecurrentConfig(
        dim=256, depth=4, heads=4, dim_head=64, block_width=128, num_state_vectors=64, max_seq_len=512
    )


def block_recurrent_bench() -> BlockRecurrentConfig:
    """The shared benchmark size (dim 256, depth 4, heads 4) with the reference's defaults:
    blocks of 512, 512 state vectors, one recurrent layer in the middle."""
    return BlockRecurrentConfig(dim=256, depth=4, heads=4, dim_head=64, block_width=512, max_seq_len=65536)


@dataclass
class BlockRecurrentState:
    """Everything carried from one call to the next.

    ``memory``: the XL memory (previous blocks); ``pending``: the keys/values (and mask) of
    the block being filled, fewer than ``block_width`` positions; ``states``: per recurrent
    layer [B, S, dim] in layer order, or None for the learned initial states;
    ``read_caches``: the prepared states of the current block (derived; dropped on detach).
    """

    memory: XLMemory
    pending: XLMemory
    states: list[Tensor] | None = None
    read_caches: list[ReadCache] | None = None

    @property
    def batch_size(self) -> int:
        return self.memory.kv[0].shape[1]


class BlockRecurrentLayer(nn.Module):
    """One layer's weights: attention branch (+ state reads), feed-forward branch, and the
    state container when the layer is recurrent."""

    def __init__(self, config: BlockRecurrentConfig, *, qk_rmsnorm: bool, reads: int, recurrent: bool):
        super().__init__()
        c = config
        inner = c.heads * c.dim_head
        self.heads = c.heads
        self.norm = LayerNorm(c.dim, bias=False)
        self.to_q = nn.Linear(c.dim, inner, bias=False)
        self.to_kv = nn.Linear(c.dim, 2 * c.dim_head, bias=False)
        self.qk_norm = QKNorm(c.dim_head) if qk_rmsnorm else None
        self.scale = c.qk_rmsnorm_scale if qk_rmsnorm else None
        self.to_out = nn.Linear(inner * (1 + reads), c.dim, bias=False)
        self.state_container = None
        if recurrent:
            self.state_container = StateContainer(
                c.dim,
                num_state_vectors=c.state_vectors(),
                dim_head=c.dim_head,
                heads=c.heads,
                qk_rmsnorm=qk_rmsnorm,
                qk_rmsnorm_scale=c.qk_rmsnorm_scale,
                gate_type=c.gate_type,
                backend=c.attn_backend,
            )
        self.ff_norm = LayerNorm(c.dim, bias=False)
        self.ff = GEGLUFeedForward(c.dim, mult=c.ff_mult, bias=False)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class _GatedFeedForward(torch.autograd.Function):
    """``w2 (gelu(a) * b)`` with ``[a ; b] = w1 x``, saving only x and ``w1 x`` for the backward
    pass, where the gated activation is recomputed (autograd would also keep gelu(a) and the
    product: 40% more feed-forward activation memory, the largest share of the model's)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        h = F.linear(x, w1)
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(a) * b, w2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, h, w1, w2 = ctx.saved_tensors
        dt = h.dtype  # the compute dtype of the forward (lower under autocast)
        a, b = h.chunk(2, dim=-1)
        grad = grad.to(dt)
        # In-place steps keep the temporaries few: this runs while every activation is saved.
        cdf = torch.erf(a * 0.5**0.5).mul_(0.5).add_(0.5)
        gated = torch.mul(a, cdf).mul_(b)
        grad_w2 = grad.flatten(0, -2).T @ gated.flatten(0, -2)
        del gated
        grad_gated = grad @ w2.to(dt)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.mul(a, cdf, out=grad_b)
        grad_b.mul_(grad_gated)
        slope = torch.mul(a, a).mul_(-0.5).exp_().mul_((2 * math.pi) ** -0.5).mul_(a).add_(cdf)
        del cdf
        torch.mul(slope, b, out=grad_a)
        grad_a.mul_(grad_gated)
        del slope, grad_gated
        grad_w1 = grad_h.flatten(0, -2).T @ x.to(dt).flatten(0, -2)
        grad_x = grad_h @ w1.to(dt)
        return grad_x.to(x.dtype), grad_w1.to(w1.dtype), grad_w2.to(w2.dtype)


def _feed_forward(ff: GEGLUFeedForward, x: Tensor) -> Tensor:
    """``ff(x)`` (exact GELU, no biases, no dropout) with the lean backward above."""
    return _GatedFeedForward.apply(x, ff.w1.weight, ff.w2.weight)


def _batch(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


@dataclass
class _Chunk:
    """Positions [start, stop) of a call, all inside one block; ``finish``: they complete it."""

    index: int
    start: int
    stop: int
    finish: bool
    mask: Tensor | None


class BlockRecurrentLM(LongRangeLM):
    """Block-recurrent decoder: ``forward_lm(tokens [B, N], mask=None, state=None)`` ->
    logits [B, N, V] and the :class:`BlockRecurrentState` to continue from."""

    config_class = BlockRecurrentConfig
    carries_state = True

    def __init__(self, config: BlockRecurrentConfig) -> None:
        super().__init__(config)
        c = config
        writes, reads = c.write_layers(), c.read_layers()
        pairs = sorted(zip(writes, reads, strict=True))
        # Containers are numbered in layer order (the order of the states list);
        # readers[i] lists the containers read at layer i (0-based), writer[i] the one written.
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

    # --- state ----------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> BlockRecurrentState:
        like = self.embed.weight.new_zeros(()).to(device) if device is not None else self.embed.weight
        empty = XLMemory.empty(self.config.depth, batch_size, self.config.dim_head, like)
        return BlockRecurrentState(empty, XLMemory(list(empty.kv)))

    def detach_state(self, state: BlockRecurrentState) -> BlockRecurrentState:
        states = None if state.states is None else [s.detach() for s in state.states]
        return BlockRecurrentState(state.memory.detach(), state.pending.detach(), states)

    def reset_state_rows(self, state: BlockRecurrentState, rows: Tensor) -> BlockRecurrentState:
        if not bool(rows.any()):
            return state
        states = state.states
        if states is not None:
            keep = ~rows[:, None, None]
            states = [torch.where(keep, s, box.initial(len(rows))) for s, box in zip(states, self.containers)]
        return BlockRecurrentState(state.memory.reset_rows(rows), state.pending.reset_rows(rows), states)

    def _check_state(self, state: object, batch: int) -> None:
        if not isinstance(state, BlockRecurrentState):
            raise TypeError(f"state must be a BlockRecurrentState (or None), got {type(state).__name__}")
        if state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} batch rows, tokens have {batch}")

    # --- the flow -------------------------------------------------------------------------
    def forward_lm(
        self, tokens: Tensor, *, mask: Tensor | None = None, state: BlockRecurrentState | None = None
    ) -> LMOutput:
        """tokens [B, N] (any N: blocks continue across calls), mask [B, N] (True = real)."""
        self.check_tokens(tokens, mask, allow_longer=True)
        carry = self.config.segment_carry
        if state is not None:
            self._check_state(state, tokens.shape[0])
            if carry == "none":
                state = None
            elif carry == "xl_memory":
                state = BlockRecurrentState(state.memory, state.pending, None)
        logits, state = self._run(tokens, mask, state)
        return LMOutput(logits, None, state)

    def _run(
        self, tokens: Tensor, mask: Tensor | None, state: BlockRecurrentState | None
    ) -> tuple[Tensor, BlockRecurrentState]:
        """Layer by layer over all the call's blocks at once, except inside a span of layers
        between a read and a later write of the same states, which runs block by block."""
        batch, n = tokens.shape
        state = self.init_state(batch, tokens.device) if state is None else state
        if n == 0:
            return self.head(self.norm(self.embed(tokens))), state
        chunks = self._chunks(n, len(state.pending), mask)
        streams = [XLStream(self.memory, i, state.memory, state.pending) for i in range(self.config.depth)]
        caches = state.read_caches or [None] * len(self.containers)
        states = state.states or [None] * len(self.containers)
        tracks = [StateTrack(box, s, c, batch) for box, s, c in zip(self.containers, states, caches)]
        x, tables = self.embed(tokens), {}
        for first, last in self.spans:
            if first == last:
                x = self._layer(first, x, chunks, streams, tracks, tables)
                continue
            outs = []
            for chunk, y in zip(chunks, x.split([ch.stop - ch.start for ch in chunks], dim=1)):
                for i in range(first, last + 1):
                    y = self._layer(i, y, [chunk], streams, tracks, tables)
                outs.append(y)
            x = _batch(outs, 1)
        head = streams[0].memory
        memory = XLMemory([s.memory.kv[0] for s in streams], head.mask, head.compressed)
        pending = XLMemory([s.pending.kv[0] for s in streams], streams[0].pending.mask)
        new_states = [t.states[-1] for t in tracks]
        new_caches = [t.caches.get(len(chunks)) for t in tracks]
        new_state = BlockRecurrentState(
            memory,
            pending,
            None if all(s is None for s in new_states) else new_states,
            None if any(c is None for c in new_caches) else new_caches,
        )
        return self.head(self.norm(x)), new_state

    def _chunks(self, n: int, pending: int, mask: Tensor | None) -> list[_Chunk]:
        """Cut n positions into runs that each stay inside one block (the first continues
        the ``pending`` positions already in the current block)."""
        w, out, start = self.config.block_width, [], 0
        while start < n:
            take = min(w - pending, n - start)
            piece = None if mask is None else mask[:, start : start + take]
            out.append(_Chunk(len(out), start, start + take, pending + take == w, piece))
            start, pending = start + take, 0
        return out

    def _rotary_tables(self, keys: int, queries: int, tables: dict, dtype: torch.dtype) -> tuple[Tensor, ...]:
        if keys not in tables:
            pos = torch.arange(keys, device=self.embed.weight.device, dtype=torch.float32)
            pos = pos + (self.window - keys)
            angles = self.rotary.angles(pos)
            scale = self.rotary.xpos_scale(pos - self.window // 2)
            cos, sin = angles.cos(), angles.sin()
            tables[keys] = (cos * scale, sin * scale, cos / scale, sin / scale)
        q_cos, q_sin, k_cos, k_sin = (t.to(dtype) for t in tables[keys])
        return q_cos[keys - queries :], q_sin[keys - queries :], k_cos, k_sin

    def _layer(
        self,
        i: int,
        x: Tensor,
        chunks: list[_Chunk],
        streams: list[XLStream],
        tracks: list[StateTrack],
        tables: dict,
    ) -> Tensor:
        """Layer i over x [B, n, dim], the positions of ``chunks`` in order."""
        layer, c = self.layers[i], self.config
        batch, n = x.shape[:2]
        h = layer.norm(x)
        q = split_heads(layer.to_q(h), c.heads)
        kv = layer.to_kv(h).view(batch, n, 2, -1).permute(2, 0, 1, 3)  # [2, B, n, D]
        # split (not slicing) keeps the backward pass linear in the number of chunks.
        sizes = [chunk.stop - chunk.start for chunk in chunks]
        q_parts, kv_parts = q.split(sizes, dim=2), kv.split(sizes, dim=2)
        groups: dict[tuple, list] = {}
        for k, chunk in enumerate(chunks):
            keys, key_mask, block = streams[i].take(kv_parts[k], chunk.mask, chunk.finish)
            if i in self.writer:
                tracks[self.writer[i]].advance(chunk.index, chunk.finish, block.kv[0], block.mask)
            groups.setdefault((sizes[k], keys.shape[-2], key_mask is not None), []).append(
                (k, keys, key_mask)
            )
        outs: list[Tensor | None] = [None] * len(chunks)
        # Chunks of equal shape run as one batch: the kernels are much faster on many blocks.
        for (width, _, masked), members in groups.items():
            qg = _batch([q_parts[k] for k, _, _ in members], 0)
            keys, values = _batch([kv for _, kv, _ in members], 1)
            mg = _batch([m for _, _, m in members], 0) if masked else None
            if layer.qk_norm is not None:
                qg, keys = layer.qk_norm(qg, keys)
            q_cos, q_sin, k_cos, k_sin = self._rotary_tables(keys.shape[-2], width, tables, qg.dtype)
            qg, keys = _rotate(qg, q_cos, q_sin), _rotate(keys, k_cos, k_sin)
            out = shared_kv_attention(
                qg, keys, values, key_mask=mg, causal=True, scale=layer.scale, backend=c.attn_backend
            )
            for (k, _, _), piece in zip(members, out.split(batch)):
                outs[k] = piece
        pieces = [merge_heads(_batch(outs, 2))]
        h_parts = h.split(sizes, dim=1)
        for j in self.readers[i]:
            pieces.append(self._read(j, h_parts, chunks, tracks[j]))
        x = x + layer.to_out(_batch(pieces, -1))
        return x + _feed_forward(layer.ff, layer.ff_norm(x))

    def _read(self, j: int, h_parts: tuple[Tensor, ...], chunks: list[_Chunk], track: StateTrack) -> Tensor:
        """Container j read by the tokens h [B, n_k, dim] of each chunk, from the states at
        the chunk's block start; chunks of equal width in one batch -> [B, n, H*D]."""
        box, batch = self.containers[j], h_parts[0].shape[0]
        groups: dict[int, list[int]] = {}
        for k, part in enumerate(h_parts):
            groups.setdefault(part.shape[1], []).append(k)
        outs: list[Tensor | None] = [None] * len(chunks)
        for members in groups.values():
            caches = [track.cache(chunks[k].index) for k in members]
            k_states = _batch([cache.k for cache in caches], 0)
            v_states = _batch([cache.v for cache in caches], 0)
            hg = _batch([h_parts[k] for k in members], 0)
            out = box.read(hg, ReadCache(k_states, k_states, k_states, v_states))
            for k, piece in zip(members, out.split(batch)):
                outs[k] = piece
        return _batch(outs, 1)

    def flush(self, state: BlockRecurrentState) -> BlockRecurrentState:
        """Finish a partially filled block now: write the states from its keys/values and push
        them into the XL memory (what a complete block does)."""
        pending = state.pending
        if not len(pending):
            return state
        caches = state.read_caches
        if caches is None:
            states = state.states or [None] * len(self.containers)
            caches = [box.prepare(s, state.batch_size) for box, s in zip(self.containers, states)]
        new_states = [cache.states for cache in caches]
        for i, j in self.writer.items():
            kv = pending.kv[i]
            new_states[j] = self.containers[j].write(caches[j], kv[0], kv[1], pending.mask)
        memory = self.memory.push(state.memory, pending.kv, pending.mask)
        empty = XLMemory.empty(self.config.depth, state.batch_size, self.config.dim_head, pending.kv[0])
        return BlockRecurrentState(memory, empty, new_states)

    # --- decoding -------------------------------------------------------------------------
    def context_limit(self) -> int | None:
        return None

    def prefill(
        self, tokens: Tensor, state: BlockRecurrentState | None = None
    ) -> tuple[Tensor, BlockRecurrentState]:
        self.check_tokens(tokens, allow_longer=True)
        if state is not None:
            self._check_state(state, tokens.shape[0])
        return self._run(tokens, None, state)

    def step(self, token: Tensor, state: BlockRecurrentState) -> tuple[Tensor, BlockRecurrentState]:
        """One token per row [B]: attends to the memory, its block so far and the states."""
        logits, state = self._run(token[:, None], None, state)
        return logits[:, -1], state


register_family(
    "block_recurrent",
    BlockRecurrentConfig,
    BlockRecurrentLM,
    {"tiny": block_recurrent_tiny, "small": block_recurrent_small, "bench": block_recurrent_bench},
    description="block-recurrent transformer: block attention + XL memory + gated recurrent states",
)

from longrange.models.block_recurrent_compat import (  # noqa: E402  (the compat classes build on the above)
    BlockRecurrentTransformer,
    RecurrentTrainerWrapper,
)

__all__ = [
    "BlockRecurrentConfig",
    "BlockRecurrentLM",
    "BlockRecurrentState",
    "BlockRecurrentTransformer",
    "RecurrentTrainerWrapper",
    "block_recurrent_bench",
    "block_recurrent_small",
    "block_recurrent_tiny",
]
