"""The block-recurrent-transformer-pytorch names on the shared flow: ``BlockRecurrentTransformer``,
``RecurrentTrainerWrapper``, and the weight converter for ``longrange.convert.load_reference``.

Conventions kept from the reference: ``forward(x, return_loss=False, xl_memories=[],
states=[], return_memories_and_states=None)`` returns ``(logits or loss, memories, states)``,
memories as one [2, B, M, D] tensor per layer and states as one [B, S, dim] tensor per
recurrent layer (layer order), both detached, returned by default only when ``x`` fills
``max_seq_len``. Where the reference is wrong we are not:
- ``mask`` (B, N; True = real token) is accepted; the returned memory list carries the mask
  of its positions in its ``mask`` attribute (an :class:`XLMemoryList`), and passing that
  list back keeps padding hidden in the next call;
- a final block shorter than ``block_width`` updates the states *and* the XL memory (the
  reference updates only the states), so both describe the same tokens;
- ``generate`` decodes incrementally from a state instead of re-running the window for each
  token, and ``RecurrentTrainerWrapper.generate`` carries that state across segments.

Scores of qk-normalised attention: the reference defines ``qk_rmsnorm_scale = 8`` but never
applies it (its attention kernel rescales by ``dim_head ** -0.5`` regardless), so its trained
weights expect ``dim_head ** -0.5``; this class defaults to that (pass ``qk_rmsnorm_scale`` to
change it), while the family's own config defaults to the intended 8. ``use_flash_attn`` is
accepted with either value: attention always runs on the fused kernel.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.convert import copy_weights, register_converter
from longrange.generation import sample_next
from longrange.memory.xl import XLMemory
from longrange.models.block_recurrent import BlockRecurrentConfig, BlockRecurrentLM, BlockRecurrentState


class XLMemoryList(list):
    """A list of per-layer memories [2, B, M, D] with the key mask [B, M] of its positions
    (``mask``; None = all real), so that padding stays masked when passed back."""

    mask: Tensor | None = None


def _memories_in(model: BlockRecurrentLM, xl_memories: Any, batch: int, like: Tensor) -> XLMemory:
    if xl_memories is None:
        xl_memories = []
    if not isinstance(xl_memories, (list, tuple)):
        raise TypeError(f"xl_memories must be a list of tensors, got {type(xl_memories).__name__}")
    depth, dim_head = model.config.depth, model.config.dim_head
    given = [m for m in xl_memories if m is not None]
    if not given:
        return XLMemory.empty(depth, batch, dim_head, like)
    if len(xl_memories) != depth or len(given) != depth:
        raise ValueError(f"xl_memories must hold one memory per layer ({depth}), got {len(xl_memories)}")
    for m in given:
        if not isinstance(m, Tensor) or m.dim() != 4 or m.shape[0] != 2 or m.shape[1] != batch:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"each xl memory must be [2, {batch}, M, {dim_head}], got {shape}")
    mask = getattr(xl_memories, "mask", None)
    length = given[0].shape[-2]
    return XLMemory(list(given), mask, max(0, length - model.config.block_width))


def _states_in(model: BlockRecurrentLM, states: Any, batch: int) -> list[Tensor] | None:
    if states is None or len(states) == 0:
        return None
    boxes = model.containers
    if not isinstance(states, (list, tuple)) or len(states) != len(boxes):
        raise ValueError(f"states must hold one tensor per recurrent layer ({len(boxes)}), got {len(states)}")
    out = []
    for s, box in zip(states, boxes):
        if s.dim() == 2:
            s = s[None].expand(batch, -1, -1)
        if s.shape != (batch, box.num_state_vectors, model.config.dim):
            raise ValueError(
                f"each state must be [{batch}, {box.num_state_vectors}, {model.config.dim}], "
                f"got {tuple(s.shape)}"
            )
        out.append(s)
    return out


def _lists_out(state: BlockRecurrentState) -> tuple[XLMemoryList, list[Tensor]]:
    memories = XLMemoryList(kv.detach() for kv in state.memory.kv)
    memories.mask = state.memory.mask
    states = [] if state.states is None else [s.detach() for s in state.states]
    return memories, states


class BlockRecurrentTransformer(BlockRecurrentLM):
    """Drop-in for ``block_recurrent_transformer_pytorch.BlockRecurrentTransformer``.

    Takes the reference's keywords (or a :class:`BlockRecurrentConfig`); further keywords of
    the config (``gate_type``, ``xpos_scale_base``, ``attn_backend``, ...) are accepted too.
    """

    def __init__(
        self,
        config: BlockRecurrentConfig | None = None,
        *,
        num_tokens: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        dim_head: int = 64,
        heads: int = 8,
        all_layers_qk_rmsnorm: bool = False,
        ff_mult: float = 4,
        max_seq_len: int = 1024,
        block_width: int = 512,
        recurrent_layers: tuple[int, ...] | None = None,
        read_recurrent_layers: tuple[int, ...] | None = None,
        num_state_vectors: int | None = None,
        ignore_index: int = -100,
        use_flash_attn: bool = False,
        use_compressed_mem: bool = False,
        compressed_mem_factor: int = 4,
        **options: Any,
    ) -> None:
        if config is None:
            needed = (("num_tokens", num_tokens), ("dim", dim), ("depth", depth))
            missing = [k for k, v in needed if v is None]
            if missing:
                raise TypeError(f"BlockRecurrentTransformer needs the keyword(s) {', '.join(missing)}")
            unknown = sorted(set(options) - set(BlockRecurrentConfig.field_names()))
            if unknown:
                raise ValueError(
                    f"unknown keyword(s) {unknown}; accepted: the reference's keywords and "
                    f"{', '.join(BlockRecurrentConfig.field_names())}"
                )
            # The reference computes qk_rmsnorm_scale but never applies it: its scores are
            # scaled by dim_head ** -0.5 in every layer. Its checkpoints need that scale.
            options.setdefault("qk_rmsnorm_scale", dim_head**-0.5)
            config = BlockRecurrentConfig(
                vocab_size=num_tokens,
                dim=dim,
                depth=depth,
                dim_head=dim_head,
                heads=heads,
                all_layers_qk_rmsnorm=all_layers_qk_rmsnorm,
                ff_mult=ff_mult,
                max_seq_len=max_seq_len,
                block_width=block_width,
                recurrent_layers=None if recurrent_layers is None else tuple(recurrent_layers),
                read_recurrent_layers=None if read_recurrent_layers is None else tuple(read_recurrent_layers),
                num_state_vectors=num_state_vectors,
                ignore_index=ignore_index,
                use_compressed_mem=use_compressed_mem,
                compressed_mem_factor=compressed_mem_factor,
                **options,
            )
        elif num_tokens is not None or dim is not None or depth is not None or options:
            raise ValueError("pass either a BlockRecurrentConfig or keywords, not both")
        super().__init__(config)
        self.use_flash_attn = bool(use_flash_attn)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def block_width(self) -> int:
        return self.config.block_width

    @property
    def ignore_index(self) -> int:
        return self.config.ignore_index

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def _state_in(self, x: Tensor, xl_memories: Any, states: Any) -> BlockRecurrentState:
        batch = x.shape[0]
        memory = _memories_in(self, xl_memories, batch, self.embed.weight)
        empty = XLMemory.empty(self.config.depth, batch, self.config.dim_head, self.embed.weight)
        return BlockRecurrentState(memory, empty, _states_in(self, states, batch))

    def forward(
        self,
        x: Tensor,
        return_loss: bool = False,
        xl_memories: list[Tensor] | None = None,
        states: list[Tensor] | None = None,
        return_memories_and_states: bool | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
        """x [B, N] (N + 1 with ``return_loss``) -> (logits [B, N, V] or loss, memories, states)."""
        self.check_tokens(x, mask, allow_longer=True)
        labels = None
        if return_loss:
            if x.shape[1] < 2:
                raise ValueError("return_loss needs at least 2 tokens per row")
            x, labels = x[:, :-1], x[:, 1:]
            if mask is not None:
                # No loss where the target or the position predicting it is padding.
                labels = labels.masked_fill(~(mask[:, 1:] & mask[:, :-1]), self.config.ignore_index)
                mask = mask[:, :-1]
        if x.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        if return_memories_and_states is None:
            return_memories_and_states = x.shape[1] == self.config.max_seq_len
        logits, state = self._run(x, mask, self._state_in(x, xl_memories, states))
        memories = next_states = None
        if return_memories_and_states:
            memories, next_states = _lists_out(self.flush(state))
        if labels is None:
            return logits, memories, next_states
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.config.ignore_index)
        return loss, memories, next_states

    @torch.no_grad()
    def generate(
        self,
        prime: Tensor,
        length: int | None = None,
        xl_memories: list[Tensor] | None = None,
        states: list[Tensor] | None = None,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        return_memories_and_states: bool = False,
    ):
        """Sample until the sequence (prime included) is ``length`` long (max_seq_len + 1 by
        default); returns the new tokens [B, length - prime length] (and, on request, the
        memories and states after every token fed to the model)."""
        length = self.config.max_seq_len + 1 if length is None else length
        self.check_tokens(prime, allow_longer=True)
        if prime.shape[1] == 0 or prime.shape[1] >= length:
            raise ValueError(f"prime length ({prime.shape[1]}) must be in [1, length={length})")
        was_training = self.training
        self.eval()
        try:
            state = self._state_in(prime, xl_memories, states)
            new, state = _sample(self, prime, length - prime.shape[1], state, temperature, filter_thres)
        finally:
            self.train(was_training)
        if return_memories_and_states:
            return (new, *_lists_out(self.flush(state)))
        return new


def _sample(
    model: BlockRecurrentLM, prime: Tensor, count: int, state, temperature: float, filter_thres: float
):
    """Incremental sampling with the reference's top-k rule: keep ceil((1 - thres) * V)."""
    if not 0 <= filter_thres < 1:
        raise ValueError(f"filter_thres must lie in [0, 1), got {filter_thres}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_k = math.ceil((1 - filter_thres) * model.config.vocab_size)
    logits, state = model.prefill(prime, state)
    logits, out = logits[:, -1], []
    for i in range(count):
        token = sample_next(logits, temperature=temperature, top_k=top_k)
        out.append(token)
        if i < count - 1:
            logits, state = model.step(token, state)
    return torch.stack(out, dim=1), state


class RecurrentTrainerWrapper(nn.Module):
    """Trains on sequences of k * max_seq_len + 1 tokens, segment by segment, with the XL
    memories and states of each segment passed (detached) to the next; in training each is
    dropped before a segment with probability ``xl_memories_dropout`` / ``state_dropout``."""

    def __init__(
        self,
        transformer: BlockRecurrentTransformer,
        xl_memories_dropout: float = 0.0,
        state_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(transformer, BlockRecurrentTransformer):
            got = type(transformer).__name__
            raise TypeError(f"transformer must be a BlockRecurrentTransformer, got {got}")
        for name, p in (("xl_memories_dropout", xl_memories_dropout), ("state_dropout", state_dropout)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        self.transformer = transformer
        self.seq_len = transformer.max_seq_len
        self.xl_memories_dropout = xl_memories_dropout
        self.state_dropout = state_dropout

    @torch.no_grad()
    def generate(self, prime: Tensor, length: int, temperature: float = 1.0, filter_thres: float = 0.9):
        """Sample until the sequence is ``length`` long, across as many segments as needed,
        with one state carried throughout; returns the new tokens [B, length - prime length]."""
        model = self.transformer
        model.check_tokens(prime, allow_longer=True)
        if prime.shape[1] == 0 or prime.shape[1] >= length:
            raise ValueError(f"prime length ({prime.shape[1]}) must be in [1, length={length})")
        was_training = model.training
        model.eval()
        try:
            new, _ = _sample(model, prime, length - prime.shape[1], None, temperature, filter_thres)
        finally:
            model.train(was_training)
        return new

    def forward(self, x: Tensor, return_memories_and_states: bool = False, mask: Tensor | None = None):
        """x [B, k * max_seq_len + 1] -> mean loss over the k segments."""
        total, seq_len = x.shape[1], self.seq_len
        if total < 2 or (total - 1) % seq_len:
            raise ValueError(
                f"length of sequence ({total}) must be a multiple of {seq_len} plus 1 (one extra token)"
            )
        segments = (total - 1) // seq_len
        loss_sum: Tensor | float = 0.0
        memories: list[Tensor] = []
        states: list[Tensor] = []
        for i in range(segments):
            start, end = i * seq_len, (i + 1) * seq_len + 1
            if self.training and random.random() < self.xl_memories_dropout:
                memories = []
            if self.training and random.random() < self.state_dropout:
                states = []
            loss, memories, states = self.transformer(
                x[:, start:end],
                return_loss=True,
                xl_memories=memories,
                states=states,
                return_memories_and_states=True,
                mask=None if mask is None else mask[:, start:end],
            )
            loss_sum = loss_sum + loss / segments
        if return_memories_and_states:
            return loss_sum, memories, states
        return loss_sum


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
    box_names = ["q_to_state.weight", "q_from_state.weight", "state_to_q.weight", "state_to_kv.weight"]
    box_names += ["init_state", "state_pos_ids", "to_state_out.weight", "learned_ema_beta"]
    box_names += ["state_out_to_gate.weight", "state_out_to_gate.bias"]
    qk_names = {
        "read_qk": "to_state_cross_attn",
        "self_qk": "state_self_attn",
        "write_qk": "from_state_cross_attn",
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
            for name in box_names:
                mapping[box + name] = ref_box + name
            if layer.state_container.read_qk is not None:
                for ours, theirs in qk_names.items():
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
