"""Layers of the Memorizing Transformer: local attention with one shared key/value head and a
T5 relative bias, KNNAttention (cosine attention over retrieved memories and local keys), and
the block that holds either. Dimensions: B batch, N queries, M keys, H heads, D head width,
K retrieved pairs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from longrange.memory.knn import KNNMemory
from longrange.memory.knn.retrieval import Retrieved, memory_scores, memory_values
from longrange.models.memorizing.config import MemorizingConfig
from longrange.modules.feedforward import FeedForward
from longrange.modules.positional import T5RelativePositionBias, t5_relative_position_bucket
from longrange.ops.dense.bias import ToeplitzBias, toeplitz
from longrange.ops.shared_kv import shared_kv_attention
from longrange.ops.shared_kv.naive import shared_kv_output, shared_kv_scores

Bias = Tensor | ToeplitzBias  # [H, N, M]


def relative_bias_values(module: T5RelativePositionBias, n: int, m: int, *, causal: bool = False) -> Tensor:
    """The n + m - 1 distinct values [H, n + m - 1] of ``module(n, m)`` (queries the last n
    of m positions), value t for the key t - (m - 1) positions after its query: one small
    table lookup. With ``causal`` the future gets the most negative finite value
    (:func:`causal_bias`), set on the values, not on the n x m bias."""
    weight = module.relative_attention_bias.weight
    relative = torch.arange(n + m - 1, device=weight.device) - (m - 1)  # key minus query position
    ids = t5_relative_position_bucket(
        relative, causal=module.causal, num_buckets=module.num_buckets, max_distance=module.max_distance
    )
    per_distance = (module.relative_attention_bias(ids) * module.scale).t()  # [H, n + m - 1]
    if causal:
        per_distance = per_distance.masked_fill(relative > 0, -torch.finfo(per_distance.dtype).max)
    return per_distance


def relative_bias(module: T5RelativePositionBias, n: int, m: int, *, causal: bool = False) -> Tensor:
    """``module(n, m)`` ([H, n, m], queries the last n of m positions) built from its n + m - 1
    distinct values (:func:`relative_bias_values`) as a Toeplitz matrix
    (:func:`~longrange.ops.dense.bias.toeplitz`), so the backward pass sums diagonals instead
    of scattering n * m gradients into the table."""
    # Row i of the bias reads values n-1-i .. n-1-i+m-1.
    return toeplitz(relative_bias_values(module, n, m, causal=causal), n, m)


def causal_bias(bias: Tensor | None, n: int, m: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Fold the causal mask (queries are the last n of m positions) into an additive bias
    [H or 1, n, m]: the most negative finite value above the diagonal, as the reference uses."""
    future = torch.ones(n, m, dtype=torch.bool, device=device).triu(m - n + 1)
    if bias is None:
        bias = torch.zeros(1, n, m, device=device, dtype=dtype)
    return bias.masked_fill(future, -torch.finfo(bias.dtype).max)


class Attention(nn.Module):
    """Causal attention over [earlier keys ; chunk] with one shared key/value head.

    ``project(x [B, N, C])`` -> q [B, H, N, D], k [B, N, D], v [B, N, D];
    ``attend(q, keys [B, M, D], values [B, M, D], key_valid [B, M] | None, bias)`` -> [B, N, C]
    with ``bias`` [H, N, M] the relative bias with the causal mask folded in
    (:func:`causal_bias`), a tensor or a :class:`~longrange.ops.dense.bias.ToeplitzBias` (its
    values, as the model passes it). The shared head makes each product one GEMM over all
    heads; the op ``ops/shared_kv`` runs it (in blocks of query positions where it can, key
    padding and attention dropout included). The score matrix formed here is the reference
    the tests hold the op to (``reference_path``).
    """

    knn = False
    # True: attend through the score matrix formed here instead of ops/shared_kv (the tests'
    # reference; same results)
    reference_path = False

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        xl_max_memories: int = 0,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.xl_max_memories = int(xl_max_memories)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=out_bias)
        self.attn_drop = nn.Dropout(dropout)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads), *self.project_kv(x)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, N, D] of inputs x [B, N, C] (also re-projected XL inputs)."""
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return k, v

    def logits(self, q: Tensor, keys: Tensor, key_valid: Tensor | None, bias: Bias) -> Tensor:
        return _mask_keys(shared_kv_scores(q * self.dim_head**-0.5, keys, _dense(bias)), key_valid)

    def dropout_rate(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor | None, bias: Bias) -> Tensor:
        if not self.reference_path:
            out, _ = shared_kv_attention(
                q,
                keys,
                values,
                bias,
                scale=self.dim_head**-0.5,
                key_mask=key_valid,
                dropout=self.dropout_rate(),
            )
            return self.to_out(out.flatten(2))
        attn = self.attn_drop(self.logits(q, keys, key_valid, bias).softmax(dim=-1))
        out = shared_kv_output(attn, values)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _dense(bias: Bias) -> Tensor:
    return bias.dense() if isinstance(bias, ToeplitzBias) else bias


def _mask_keys(sim: Tensor, key_valid: Tensor | None) -> Tensor:
    if key_valid is None:
        return sim
    return sim.masked_fill(~key_valid[:, None, None, :], -torch.finfo(sim.dtype).max)


class KNNAttention(Attention):
    """Cosine attention over retrieved memories and [earlier keys ; chunk]: one softmax, or
    (``combine="gate"``) a softmax each mixed by a learned per-head gate.

    ``attend(q, keys, values, key_valid, bias, retrieved=Retrieved | None)`` (the K pairs
    each query [B, H, N] found: their ids into the memory's tables, their scores and which
    were found, ``memory/knn/retrieval.py``; the pairs are read from the tables inside fused
    calls, never gathered); ``project`` returns unit-norm queries and keys, and the logits are
    scaled by a learned per-head temperature (initially ``attn_scale_init``). The reference's
    ``forward(x, knn_memory=..., xl_memory=..., add_knn_memory=..., rel_pos_bias=...)`` is kept
    for stand-alone use.
    """

    knn = True

    def __init__(
        self,
        *,
        num_retrieved_memories: int = 32,
        attn_scale_init: float = 20,
        gate_output: bool = False,
        combine: str = "softmax",
        **attention: Any,
    ) -> None:
        """``attention``: the keywords of :class:`Attention` (``dim``, ``heads``, ``dim_head``,
        ``dropout``, ``xl_max_memories``); the output projection has no bias."""
        super().__init__(**attention, out_bias=False)
        heads = self.heads
        self.num_retrieved_memories = num_retrieved_memories
        self.scale = nn.Parameter(torch.full((heads, 1, 1), math.log(attn_scale_init)))
        self.output_gate = nn.Parameter(torch.zeros(1)) if gate_output else None
        # per-head bias of the memory gate sigmoid(b) ("gate" combine); 0 starts at an even mix
        self.memory_gate = nn.Parameter(torch.zeros(heads, 1, 1)) if combine == "gate" else None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project(x)
        return F.normalize(q, dim=-1), k, v

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = super().project_kv(x)
        return F.normalize(k, dim=-1), v

    def attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        key_valid: Tensor | None,
        bias: Bias,
        retrieved: Retrieved | None = None,
    ) -> Tensor:
        scale = self.scale.exp()
        if not self.reference_path:
            out = self._attend_by_op(q, keys, values, key_valid, bias, retrieved, scale)
        else:
            out = self._attend(q, keys, values, key_valid, _dense(bias), retrieved, scale)
        out = self.to_out(out.flatten(2))
        if self.output_gate is not None:
            out = out * self.output_gate.tanh()
        return out

    def _attend_by_op(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        key_valid: Tensor | None,
        bias: Bias,
        retrieved: Retrieved | None,
        scale: Tensor,
    ) -> Tensor:
        """One softmax over the retrieved pairs and the keys (or, gated, one each) -> [B, N, H, D]."""
        rate = self.dropout_rate()
        if retrieved is None or self.memory_gate is not None:  # the keys' own softmax
            local = shared_kv_attention(q * scale, keys, values, bias, key_mask=key_valid, dropout=rate)[0]
            if retrieved is None:
                return local
        sim_mem = memory_scores(q, retrieved) * scale  # the search scored the unscaled q
        sim_mem = sim_mem.masked_fill(~retrieved.found, -torch.finfo(sim_mem.dtype).max)
        if self.memory_gate is not None:
            remote = F.dropout(sim_mem.softmax(dim=-1), rate).to(values.dtype)
            remote = memory_values(remote, retrieved).transpose(1, 2)
            # a query that found no memory keeps its local attention whole
            gate = self.memory_gate.sigmoid() * retrieved.found.any(dim=-1, keepdim=True)
            return local + gate.transpose(1, 2).to(local.dtype) * (remote - local)
        out, weights = shared_kv_attention(
            q * scale, keys, values, bias, memory_logits=sim_mem, key_mask=key_valid, dropout=rate
        )
        return out + memory_values(weights.transpose(1, 2), retrieved).transpose(1, 2)

    def _attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        key_valid: Tensor | None,
        bias: Tensor,
        retrieved: Retrieved | None,
        scale: Tensor,
    ) -> Tensor:
        """The same through the score matrix formed here (``reference_path``) -> [B, N, H, D]."""
        sim = _mask_keys(shared_kv_scores(q * scale, keys, bias), key_valid)
        if retrieved is None:
            attn = self.attn_drop(sim.softmax(dim=-1))
            out = shared_kv_output(attn, values)
        else:
            found = retrieved.found
            sim_mem = memory_scores(q, retrieved) * scale
            sim_mem = sim_mem.masked_fill(~found, -torch.finfo(sim_mem.dtype).max)
            if self.memory_gate is None:
                k = sim_mem.shape[-1]
                attn = self.attn_drop(torch.cat([sim_mem, sim.to(sim_mem.dtype)], dim=-1).softmax(dim=-1))
                attn = attn.to(values.dtype)
                out = shared_kv_output(attn[..., k:], values)
                out = out + memory_values(attn[..., :k], retrieved)
            else:
                local = shared_kv_output(self.attn_drop(sim.softmax(dim=-1)), values)
                remote = self.attn_drop(sim_mem.softmax(dim=-1)).to(values.dtype)
                remote = memory_values(remote, retrieved)
                # a query that found no memory keeps its local attention whole
                gate = self.memory_gate.sigmoid() * found.any(dim=-1, keepdim=True)
                out = local + gate.to(local.dtype) * (remote - local)
        return out.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        *,
        knn_memory: KNNMemory,
        xl_memory: Tensor | None = None,
        add_knn_memory: bool = True,
        rel_pos_bias: Tensor | None = None,
    ):
        """Reference convention: x [B, N, C] -> (out [B, N, C], new XL memory [B, L, 2, D] | None)."""
        q, k, v = self.project(x)
        if xl_memory is not None:
            k = torch.cat([xl_memory[..., 0, :], k], dim=1)
            v = torch.cat([xl_memory[..., 1, :], v], dim=1)
        n, m = q.shape[2], k.shape[1]
        bias = None
        if rel_pos_bias is not None:
            bias = rel_pos_bias.reshape(-1, *rel_pos_bias.shape[-2:])[:, -n:, -m:]
        bias = causal_bias(bias, n, m, device=q.device)
        ids, scores, found = knn_memory.lookup(q, self.num_retrieved_memories)
        lease = knn_memory.lease(ids) if q.requires_grad else None
        retrieved = Retrieved(ids, scores, found, knn_memory.key_table(), knn_memory.value_table(), lease)
        out = self.attend(q, k, v, None, bias, retrieved)
        entries = torch.stack([k, v], dim=-2).detach()
        keep = self.xl_max_memories
        leaving, xl = (entries[:, :-keep], entries[:, -keep:]) if keep else (entries, None)
        if add_knn_memory and leaving.shape[1]:
            knn_memory.add(leaving)
        return out, xl


class MemorizingBlock(nn.Module):
    """Pre-norm attention (KNNAttention in a memorizing layer) and feed-forward."""

    def __init__(self, config: MemorizingConfig, layer: int) -> None:
        super().__init__()
        c = config
        xl = c.xl_max_memories if layer in c.xl_layer_numbers else 0
        self.attn_norm = nn.LayerNorm(c.dim)
        if layer in c.knn_layer_numbers:
            self.attn: Attention = KNNAttention(
                dim=c.dim,
                heads=c.knn_attn_heads or c.heads,
                dim_head=c.head_width,
                dropout=c.attn_dropout,
                num_retrieved_memories=c.num_retrieved_memories,
                xl_max_memories=xl,
                attn_scale_init=c.attn_scale_init,
                gate_output=c.knn_gate_output,
                combine=c.knn_combine,
            )
        else:
            self.attn = Attention(
                dim=c.dim, heads=c.heads, dim_head=c.head_width, dropout=c.attn_dropout, xl_max_memories=xl
            )
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, mult=c.ff_mult, dropout=c.ff_dropout)
