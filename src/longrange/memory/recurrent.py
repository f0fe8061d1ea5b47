"""Recurrent state vectors of the Block-Recurrent Transformer (Hutchins et al. 2022).

A recurrent layer owns S learned state vectors of width ``dim``. For every block:
- **read**: each token of the block cross-attends to the states as they were at the start of
  the block (token -> state attention; its output joins the layer's self-attention output);
- **write**, once the block is complete: the states self-attend, and cross-attend to the
  block's keys/values (state -> block attention); the two results are projected back to
  ``dim`` and gated into the previous states.

Two gates:
- ``"fixed"`` (the reference's choice): ``d * W h + (1 - d) * c`` with ``d = sigmoid(beta)``
  a learned per-feature decay;
- ``"lstm"`` (the paper's LSTM-style gate): ``z = tanh(W_z h)``, ``i = sigmoid(W_i h - 1)``,
  ``f = sigmoid(W_f h + 1)``, ``c' = f * c + i * z`` (the offsets start the gate biased
  towards remembering).

The states get learned position embeddings (``state_pos_ids``) before each read/write, and
all three attentions use one shared key/value head. With ``qk_rmsnorm`` queries and keys are
L2-normalised and scaled by learned per-feature gains, and the scores by a fixed
``qk_rmsnorm_scale``. Nothing is cached on the module: :meth:`prepare` returns the
:class:`ReadCache` a read and the later write share, so that states of several segments or
decoding streams never mix.

Dimensions: B batch, S state vectors, N block positions, H heads, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrange.modules.norms import LayerNorm
from longrange.ops.blockrec import shared_kv_attention


class _ScaledL2Norm(torch.autograd.Function):
    """``F.normalize(x, dim=-1) * gain``, saving only x and its inverse norm for the backward
    pass (autograd would also keep the normalised copy). The backward takes four passes over
    x-sized tensors instead of eight (1.2x fwd + bwd on heads-split [8, 4, 512, 64] views)."""

    @staticmethod
    def forward(ctx, x: Tensor, gain: Tensor) -> Tensor:
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        ctx.save_for_backward(x, inv, gain)
        return x * inv * gain

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        # with u = x * inv and g = grad * gain: dx = inv * (g - u (g . u)), d gain = sum grad * u
        x, inv, gain = ctx.saved_tensors
        # under autocast x may be bfloat16 while the output (x * inv * gain) and so its
        # gradient are float32: the maths runs in the wider of the two
        wide = torch.promote_types(x.dtype, grad.dtype)
        x, inv, grad = x.to(wide), inv.to(wide), grad.to(wide)
        g = grad * gain
        along = torch.linalg.vecdot(g, x, dim=-1).unsqueeze(-1).mul_(inv).mul_(inv)
        grad_x = torch.addcmul(g, x, along, value=-1).mul_(inv)
        grad_gain = (grad * x).mul_(inv).reshape(-1, gain.shape[-1]).sum(dim=0)
        return grad_x, grad_gain


class QKNorm(nn.Module):
    """L2-normalise queries and keys over the head width, then scale each feature by a
    learned gain (one gain vector for queries, one for keys)."""

    def __init__(self, dim_head: int) -> None:
        super().__init__()
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return _ScaledL2Norm.apply(q, self.q_scale), _ScaledL2Norm.apply(k, self.k_scale)


@dataclass
class ReadCache:
    """What a block's reads and its write share: the states at the block start [B, S, dim],
    their normalised + position-embedded form, and their one key/value head [B, S, D]."""

    states: Tensor
    normed: Tensor
    k: Tensor
    v: Tensor

    def detach(self) -> ReadCache:
        return ReadCache(self.states.detach(), self.normed.detach(), self.k.detach(), self.v.detach())


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D]"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, N, D] -> [B, N, H*D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class StateContainer(nn.Module):
    """The states of one recurrent layer and the weights that read and write them."""

    def __init__(
        self,
        dim: int,
        *,
        num_state_vectors: int,
        dim_head: int = 64,
        heads: int = 8,
        qk_rmsnorm: bool = False,
        qk_rmsnorm_scale: float = 8.0,
        gate_type: str = "fixed",
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if num_state_vectors <= 0:
            raise ValueError(f"num_state_vectors must be positive, got {num_state_vectors}")
        if gate_type not in ("fixed", "lstm"):
            raise ValueError(f"gate_type must be 'fixed' or 'lstm', got {gate_type!r}")
        inner = dim_head * heads
        self.heads, self.gate_type, self.backend = heads, gate_type, backend
        self.scale = qk_rmsnorm_scale if qk_rmsnorm else None
        self.state_norm = LayerNorm(dim, bias=False)
        self.q_to_state = nn.Linear(dim, inner, bias=False)
        self.q_from_state = nn.Linear(dim, inner, bias=False)
        self.state_to_q = nn.Linear(dim, inner, bias=False)
        self.state_to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.init_state = nn.Parameter(torch.randn(num_state_vectors, dim))
        self.state_pos_ids = nn.Parameter(torch.randn(num_state_vectors, dim))
        self.to_state_out = nn.Linear(2 * inner, dim, bias=False)
        # One QKNorm per attention: token -> state (read), state -> state, state -> block.
        self.read_qk = QKNorm(dim_head) if qk_rmsnorm else None
        self.self_qk = QKNorm(dim_head) if qk_rmsnorm else None
        self.write_qk = QKNorm(dim_head) if qk_rmsnorm else None
        if gate_type == "fixed":
            self.state_out_to_gate = nn.Linear(dim, dim)
            self.learned_ema_beta = nn.Parameter(torch.randn(dim))
        else:
            self.lstm_gate = nn.Linear(dim, 3 * dim)

    @property
    def num_state_vectors(self) -> int:
        return self.init_state.shape[0]

    def initial(self, batch: int) -> Tensor:
        """The learned initial states for ``batch`` rows: [B, S, dim]."""
        return self.init_state[None].expand(batch, -1, -1)

    def prepare(self, states: Tensor | None, batch: int) -> ReadCache:
        """Normalise the states of a block start (None = the initial states) for reading."""
        states = self.initial(batch) if states is None else states
        normed = self.state_norm(states) + self.state_pos_ids
        k, v = self.state_to_kv(normed).chunk(2, dim=-1)
        return ReadCache(states, normed, k, v)

    def _attend(self, qk: QKNorm | None, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None):
        if qk is not None:
            q, k = qk(q, k)
        return shared_kv_attention(q, k, v, key_mask=mask, scale=self.scale, backend=self.backend)

    def read(self, h: Tensor, cache: ReadCache) -> Tensor:
        """Tokens h [B, N, dim] (the layer's normalised input) attend to the states -> [B, N, H*D]."""
        q = split_heads(self.q_to_state(h), self.heads)
        return merge_heads(self._attend(self.read_qk, q, cache.k, cache.v))

    def write(self, cache: ReadCache, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The states after a block whose keys/values are k, v [B, N, D] (key_mask [B, N],
        True = real token) -> [B, S, dim]."""
        normed = cache.normed
        state_q = split_heads(self.state_to_q(normed), self.heads)
        from_q = split_heads(self.q_from_state(normed), self.heads)
        self_out = self._attend(self.self_qk, state_q, cache.k, cache.v)
        cross_out = self._attend(self.write_qk, from_q, k, v, key_mask)
        # Per head [self ; cross], as the reference lays out its projection's input.
        h = self.to_state_out(merge_heads(torch.cat((self_out, cross_out), dim=-1)))
        if self.gate_type == "fixed":
            decay = self.learned_ema_beta.sigmoid()
            return decay * self.state_out_to_gate(h) + (1 - decay) * cache.states
        z, i, f = self.lstm_gate(h).chunk(3, dim=-1)
        return torch.sigmoid(f + 1.0) * cache.states + torch.sigmoid(i - 1.0) * torch.tanh(z)


class StateTrack:
    """One container's states as a call moves through its pieces (runs of positions inside
    one block, numbered 0, 1, ...): ``states[j]`` holds the states at the start of piece j
    (None = the initial states) and :meth:`cache` their prepared form. Pieces are advanced in
    order; a piece that completes its block writes new states."""

    def __init__(self, box: StateContainer, states: Tensor | None, cache: ReadCache | None, batch: int):
        self.box, self.batch = box, batch
        self.states: list[Tensor | None] = [states]
        self.caches: dict[int, ReadCache] = {} if cache is None else {0: cache}

    def cache(self, j: int) -> ReadCache:
        if j not in self.caches:
            self.caches[j] = self.box.prepare(self.states[j], self.batch)
        return self.caches[j]

    def advance(self, j: int, finish: bool, block_kv: Tensor, block_mask: Tensor | None) -> None:
        """Move past piece j, writing from the block's keys/values [2, B, N, D] if it is complete."""
        if len(self.states) != j + 1:
            raise RuntimeError(f"pieces must be advanced in order (at {len(self.states) - 1}, got {j})")
        cache = self.cache(j)
        if finish:
            self.states.append(self.box.write(cache, block_kv[0], block_kv[1], block_mask))
        else:
            self.states.append(self.states[j])
            self.caches[j + 1] = cache
