"""Mixture of experts with top-2 gating (Shazeer et al. 2017; GShard, Lepikhin et al. 2020).

Behaviour follows the mixture-of-experts package the routing reference uses (itself a port
of tensor2tensor's ``moe.py``); each batch row is one group:

- a softmax gate picks each token's best expert and its second best; the two gate values are
  renormalised to sum to one;
- the second expert is used according to a policy: ``"all"``, ``"none"``, ``"threshold"``
  (gate value above the threshold) or ``"random"`` (kept with probability
  ``gate / threshold``; random in eval too, as in the package);
- each expert takes at most ``capacity = max(4, min(N, int(N * capacity_factor / E)))``
  tokens per row, first come first served in sequence order; first choices take the slots
  before second choices. Tokens over capacity get nothing from that expert;
- the auxiliary load-balancing loss is ``E**2 * mean(fraction routed to e * mean gate of e)``
  times ``loss_coef``.

Two differences from the package, both opt-in or invisible when unused:

- ``causal=True``: the package gives second choices the slots left after *all* first choices
  of the row, so whether a token's second expert runs depends on later tokens. In causal mode
  the slots are handed out token by token (first then second choice), so the output at t
  depends on tokens <= t only.
- ``mask`` [B, N] (True = real token): padded tokens are routed nowhere, take no capacity and
  do not enter the balancing loss.

Dispatch uses slot indices (an ``index_add`` into a [E, B * C, D] buffer and back) rather
than the package's one-hot [B, N, E, C] tensors, so memory is O(N * D) rather than O(N^2) per
row; choices that are not dispatched carry zeros, so no shape depends on the routing (the
layer compiles into one graph).
Dimensions: B batch, N sequence, D width, E experts, C capacity, F hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longrange.modules.feedforward import make_activation

MIN_EXPERT_CAPACITY = 4
SECOND_POLICIES = ("all", "none", "threshold", "random")


class Experts(nn.Module):
    """E independent two-layer MLPs without biases: x [E, S, D] -> [E, S, D]."""

    def __init__(
        self,
        dim: int,
        num_experts: int = 16,
        hidden_dim: int | None = None,
        activation: type[nn.Module] | nn.Module | None = nn.ReLU,
    ) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        if hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}")
        bound1, bound2 = 1 / math.sqrt(hidden_dim), 1 / math.sqrt(dim)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim).uniform_(-bound2, bound2))
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return torch.bmm(self.act(torch.bmm(x, self.w1.to(x.dtype))), self.w2.to(x.dtype))


def _exclusive_cumsum(t: Tensor, dim: int) -> Tensor:
    return t.cumsum(dim) - t


class Top2Gating(nn.Module):
    """Routing decisions for x [B, N, D]; see the module docstring for the rules."""

    def __init__(
        self,
        dim: int,
        num_gates: int,
        *,
        eps: float = 1e-9,
        second_policy_train: str = "random",
        second_policy_eval: str = "random",
        second_threshold_train: float = 0.2,
        second_threshold_eval: float = 0.2,
        capacity_factor_train: float = 1.25,
        capacity_factor_eval: float = 2.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if num_gates < 2:
            raise ValueError(f"num_experts must be >= 2 for top-2 gating, got {num_gates}")
        for name, policy in (
            ("second_policy_train", second_policy_train),
            ("second_policy_eval", second_policy_eval),
        ):
            if policy not in SECOND_POLICIES:
                raise ValueError(f"{name} must be one of {SECOND_POLICIES}, got {policy!r}")
        for name, factor in (
            ("capacity_factor_train", capacity_factor_train),
            ("capacity_factor_eval", capacity_factor_eval),
        ):
            if factor <= 0:
                raise ValueError(f"{name} must be positive, got {factor}")
        self.eps = eps
        self.num_gates = num_gates
        self.w_gating = nn.Parameter(torch.randn(dim, num_gates))
        self.policy = {True: second_policy_train, False: second_policy_eval}
        self.threshold = {True: second_threshold_train, False: second_threshold_eval}
        self.capacity_factor = {True: capacity_factor_train, False: capacity_factor_eval}
        self.causal = causal

    def capacity(self, n: int) -> int:
        per_expert = int(n * self.capacity_factor[self.training] / self.num_gates)
        return max(min(n, per_expert), MIN_EXPERT_CAPACITY)

    def forward(self, x: Tensor, mask: Tensor | None = None):
        """Returns (experts, slots, gates, keep, capacity, loss), the first four [B, N, 2].

        ``keep`` is False where a choice is not dispatched (dropped by the policy, padded, or
        over capacity); ``gates`` is 0 there.
        """
        b, n, _ = x.shape
        e = self.num_gates
        logits = x @ self.w_gating.to(x.dtype)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        probs = logits.softmax(dim=-1)  # [B, N, E]
        gate1, expert1 = probs.max(dim=-1)
        gate2, expert2 = probs.scatter(-1, expert1[..., None], 0.0).max(dim=-1)
        denom = gate1 + gate2 + self.eps
        gate1, gate2 = gate1 / denom, gate2 / denom

        real = torch.ones(b, n, device=x.device) if mask is None else mask.float()
        onehot1 = F.one_hot(expert1, e).float() * real[..., None]
        count = real.sum(dim=1).clamp_min(1.0)[:, None]  # [B, 1]
        fraction = onehot1.sum(dim=1) / count
        mean_gate = (probs * real[..., None]).sum(dim=1) / count
        loss = (fraction * mean_gate).mean() * float(e**2)

        policy, threshold = self.policy[self.training], self.threshold[self.training]
        if policy == "all":
            keep2 = torch.ones_like(gate2, dtype=torch.bool)
        elif policy == "none":
            keep2 = torch.zeros_like(gate2, dtype=torch.bool)
        elif policy == "threshold":
            keep2 = gate2 > threshold
        else:
            keep2 = torch.rand_like(gate2) < gate2 / max(threshold, self.eps)
        keep2 = keep2 & real.bool()
        onehot2 = F.one_hot(expert2, e).float() * keep2[..., None]

        capacity = self.capacity(n)
        if self.causal:
            # slots handed out in token order, each token's first choice before its second
            both = torch.stack((onehot1, onehot2), dim=2).reshape(b, 2 * n, e)
            taken = _exclusive_cumsum(both, dim=1).view(b, n, 2, e)
            slot1 = taken[:, :, 0].gather(-1, expert1[..., None]).squeeze(-1)
            slot2 = taken[:, :, 1].gather(-1, expert2[..., None]).squeeze(-1)
            keep1 = real.bool() & (slot1 < capacity)
        else:
            slot1 = _exclusive_cumsum(onehot1, dim=1).gather(-1, expert1[..., None]).squeeze(-1)
            keep1 = real.bool() & (slot1 < capacity)
            used = (onehot1 * keep1[..., None]).sum(dim=1)  # [B, E] slots taken by first choices
            before = _exclusive_cumsum(onehot2, dim=1).gather(-1, expert2[..., None]).squeeze(-1)
            slot2 = before + used.gather(-1, expert2)
        keep2 = keep2 & (slot2 < capacity)

        experts = torch.stack((expert1, expert2), dim=-1)
        slots = torch.stack((slot1, slot2), dim=-1).long()
        gates = torch.stack((gate1 * keep1, gate2 * keep2), dim=-1)
        keep = torch.stack((keep1, keep2), dim=-1)
        return experts, slots, gates, keep, capacity, loss


class MoE(nn.Module):
    """Top-2 gated mixture of E MLP experts: x [B, N, D] -> (out [B, N, D], aux_loss scalar).

    The keywords and defaults are those of the mixture-of-experts package; ``causal`` and the
    ``mask`` argument of ``forward`` are additions (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 16,
        hidden_dim: int | None = None,
        activation: type[nn.Module] | nn.Module | None = nn.ReLU,
        second_policy_train: str = "random",
        second_policy_eval: str = "random",
        second_threshold_train: float = 0.2,
        second_threshold_eval: float = 0.2,
        capacity_factor_train: float = 1.25,
        capacity_factor_eval: float = 2.0,
        loss_coef: float = 1e-2,
        *,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = Top2Gating(
            dim,
            num_experts,
            second_policy_train=second_policy_train,
            second_policy_eval=second_policy_eval,
            second_threshold_train=second_threshold_train,
            second_threshold_eval=second_threshold_eval,
            capacity_factor_train=capacity_factor_train,
            capacity_factor_eval=capacity_factor_eval,
            causal=causal,
        )
        self.experts = Experts(dim, num_experts, hidden_dim, activation)
        self.loss_coef = loss_coef

    def forward(self, x: Tensor, mask: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq, dim], got shape {tuple(x.shape)}")
        b, n, d = x.shape
        if mask is not None and (mask.shape != (b, n) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape {(b, n)}")
        experts, slots, gates, keep, capacity, loss = self.gate(x, mask)
        rows = torch.arange(b, device=x.device)[:, None, None]
        # a choice that is not dispatched points at slot 0 and carries zeros both ways (its
        # gate is 0), so every shape is fixed by (B, N): no data-dependent selection
        buffer_index = torch.where(keep, (experts * b + rows) * capacity + slots, 0).flatten()
        token_index = torch.arange(b * n, device=x.device).repeat_interleave(2)
        tokens = x.reshape(b * n, d)[token_index] * keep.flatten()[:, None].to(x.dtype)
        slots_in = x.new_zeros(self.num_experts * b * capacity, d).index_add(0, buffer_index, tokens)
        slots_out = self.experts(slots_in.view(self.num_experts, b * capacity, d))
        picked = slots_out.reshape(-1, d)[buffer_index] * gates.flatten()[:, None].to(x.dtype)
        out = x.new_zeros(b * n, d).index_add(0, token_index, picked)
        return out.view(b, n, d), loss * self.loss_coef
