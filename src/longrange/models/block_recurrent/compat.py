"""The block-recurrent-transformer-pytorch names on the segment flow: ``BlockRecurrentTransformer``
and ``RecurrentTrainerWrapper``.

Conventions kept from the reference: ``forward(x, return_loss=False, xl_memories=[],
states=[], return_memories_and_states=None)`` returns ``(logits or loss, memories, states)``,
memories as one [2, B, M, D] tensor per layer and states as one [B, S, dim] tensor per
recurrent layer (layer order), both detached, returned by default only when ``x`` fills
``max_seq_len``; ``generate`` keeps ``ceil((1 - filter_thres) * V)`` logits and divides by
``temperature`` (0: greedy). The weights start as the reference's do (PyTorch's defaults;
``BlockRecurrentLM`` keeps the family's own initialisation). Where the reference is wrong we are not:
- ``mask`` (B, N; True = real token) is accepted; the returned memory list carries the mask
  of its positions in its ``mask`` attribute (an :class:`XLMemoryList`), and passing that
  list back keeps padding hidden in the next call;
- a final block shorter than ``block_width`` updates the states *and* the XL memory (the
  reference updates only the states), so both describe the same tokens;
- ``generate`` decodes incrementally from a state (``generation.decode_loop``) instead of
  re-running the window for each token, and ``RecurrentTrainerWrapper.generate`` carries that
  state across segments.

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

from longrange.generation import decode_loop, sample_next
from longrange.memory.xl import XLMemory
from longrange.models.block_recurrent.config import BlockRecurrentConfig
from longrange.models.block_recurrent.model import BlockRecurrentLM
from longrange.models.keywords import KeywordTable
from longrange.models.reference_init import reset_torch_defaults
from longrange.models.state import State

_REFERENCE = dict(
    dim_head=64,
    heads=8,
    all_layers_qk_rmsnorm=False,
    ff_mult=4,
    max_seq_len=1024,
    block_width=512,
    recurrent_layers=None,
    read_recurrent_layers=None,
    num_state_vectors=None,
    ignore_index=-100,
    use_flash_attn=False,
    use_compressed_mem=False,
    compressed_mem_factor=4,
)
KEYWORDS = KeywordTable.for_config(
    "BlockRecurrentTransformer",
    _REFERENCE,
    BlockRecurrentConfig,
    required=("num_tokens", "dim", "depth"),
    renames={"num_tokens": "vocab_size"},
)


class XLMemoryList(list):
    """A list of per-layer memories [2, B, M, D] with the key mask [B, M] of its positions
    (``mask``; None = all real), so that padding stays masked when passed back."""

    mask: Tensor | None = None


class BlockRecurrentTransformer(BlockRecurrentLM):
    """Drop-in for ``block_recurrent_transformer_pytorch.BlockRecurrentTransformer``.

    Takes the reference's keywords (or a :class:`BlockRecurrentConfig`); further keywords of
    the config (``gate_type``, ``xpos_scale_base``, ``attn_backend``, ...) are accepted too.
    """

    def __init__(self, config: BlockRecurrentConfig | None = None, **keywords: Any) -> None:
        use_flash_attn = keywords.get("use_flash_attn", False)
        if config is None:
            fields = KEYWORDS.parse(keywords)
            use_flash_attn = fields.pop("use_flash_attn")
            # The reference computes qk_rmsnorm_scale but never applies it: its scores are
            # scaled by dim_head ** -0.5 in every layer. Its checkpoints need that scale.
            fields.setdefault("qk_rmsnorm_scale", fields["dim_head"] ** -0.5)
            config = BlockRecurrentConfig(**fields)
        elif set(keywords) - {"use_flash_attn"}:
            raise ValueError("pass either a BlockRecurrentConfig or keywords, not both")
        super().__init__(config)
        self.use_flash_attn = bool(use_flash_attn)
        self._reference_init()

    def _reference_init(self) -> None:
        """The reference's initialisation (see ``models/reference_init.py``): PyTorch's
        defaults for every linear, embedding and norm, the initial states and the gates' EMA
        logits from N(0, 0.1), the states' position embeddings from N(0, 1)."""
        reset_torch_defaults(self)
        for box in self.containers:
            nn.init.normal_(box.init_state, std=0.1)
            nn.init.normal_(box.state_pos_ids, std=1.0)
            if box.gate_type == "fixed":
                nn.init.normal_(box.learned_ema_beta, std=0.1)

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

    def state_from_lists(self, x: Tensor, xl_memories: Any, states: Any) -> State:
        """A state holding the reference's memory and state lists (empty ones: a fresh start)."""
        batch = x.shape[0]
        state = self.fresh_state(batch, x.device)
        memory = _memories_in(self, xl_memories, batch)
        if memory is not None:
            self.store_windows(state, memory, self.windows(state)[1])
        given = _states_in(self, states, batch)
        if given is not None:
            for i, s in zip(sorted(self.writer), given, strict=True):
                state.layers[i]["states"] = s
        return state

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
        state = self.state_from_lists(x, xl_memories, states)
        logits = self.advance(x, mask, state)
        memories = next_states = None
        if return_memories_and_states:
            memories, next_states = self.lists_from_state(self.flush(state))
        if labels is None:
            return logits, memories, next_states
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.config.ignore_index)
        return loss, memories, next_states

    def lists_from_state(self, state: State) -> tuple[XLMemoryList, list[Tensor]]:
        """The reference's (memories, states) lists of a state, detached."""
        memories = XLMemoryList(layer["xl"].detach() for layer in state.layers)
        memories.mask = state.shared["xl_mask"]
        held = [state.layers[i]["states"] for i in sorted(self.writer)]
        return memories, [] if any(s is None for s in held) else [s.detach() for s in held]

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
        check_generate(prime, length, temperature, filter_thres)
        state = self.state_from_lists(prime, xl_memories, states)
        new = sample(self, prime, length - prime.shape[1], state, temperature, filter_thres)
        if return_memories_and_states:
            return (new, *self.lists_from_state(self.flush(state)))
        return new


class _Continuing:
    """A decoder (``generation.Decoder``) whose first prefill continues a given state."""

    def __init__(self, model: BlockRecurrentLM, state: State | None) -> None:
        self.model, self.state = model, state

    def prefill(self, tokens: Tensor, state: State | None = None, **conditioning: Any):
        return self.model.prefill(tokens, self.state, **conditioning)

    def step(self, token: Tensor, state: State):
        return self.model.step(token, state)

    def context_limit(self) -> None:
        return None


def check_generate(prime: Tensor, length: Any, temperature: Any, filter_thres: Any) -> None:
    """ValueError for a bad ``generate`` argument, before any work: ``length`` (the final
    length, prime included) must be an integer longer than the prime."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an integer (prime included), got {length!r}")
    if prime.shape[1] == 0 or prime.shape[1] >= length:
        raise ValueError(f"prime length ({prime.shape[1]}) must be in [1, length={length})")
    if not 0 <= filter_thres < 1:
        raise ValueError(f"filter_thres must lie in [0, 1), got {filter_thres}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")


def sample(
    model: BlockRecurrentLM,
    prime: Tensor,
    count: int,
    state: State | None,
    temperature: float,
    filter_thres: float,
) -> Tensor:
    """``count`` tokens sampled after ``prime`` with the reference's rule (keep the
    ``ceil((1 - thres) * V)`` largest logits), continuing ``state`` (a fresh one when None)."""
    top_k = math.ceil((1 - filter_thres) * model.config.vocab_size)

    def pick(logits: Tensor, history: Tensor) -> Tensor:
        return sample_next(logits, temperature=temperature, top_k=top_k)

    was_training = model.training
    model.eval()
    try:
        return decode_loop(_Continuing(model, state), prime.long(), count, pick)
    finally:
        model.train(was_training)


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
        check_generate(prime, length, temperature, filter_thres)
        return sample(model, prime, length - prime.shape[1], None, temperature, filter_thres)

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


def _memories_in(model: BlockRecurrentLM, xl_memories: Any, batch: int) -> XLMemory | None:
    """The reference's memory list (one [2, B, M, D] tensor per layer) as an XL memory; None
    for an empty list."""
    if xl_memories is None:
        return None
    if not isinstance(xl_memories, (list, tuple)):
        raise TypeError(f"xl_memories must be a list of tensors, got {type(xl_memories).__name__}")
    depth, dim_head = model.config.depth, model.config.dim_head
    given = [m for m in xl_memories if m is not None]
    if not given:
        return None
    if len(xl_memories) != depth or len(given) != depth:
        raise ValueError(f"xl_memories must hold one memory per layer ({depth}), got {len(xl_memories)}")
    for m in given:
        if not isinstance(m, Tensor) or m.dim() != 4 or m.shape[0] != 2 or m.shape[1] != batch:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"each xl memory must be [2, {batch}, M, {dim_head}], got {shape}")
    mask = getattr(xl_memories, "mask", None)
    return XLMemory(list(given), mask, max(0, given[0].shape[-2] - model.config.block_width))


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
