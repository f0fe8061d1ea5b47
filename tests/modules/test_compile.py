"""The shared modules compile into one graph (torch.compile fullgraph, forward and backward)
and give the eager values: reversible and plain stacks (with layer dropout), the residual
branch with token shift, local attention with padding, attention with a mask and with a KV
cache, PKM and MoE."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from longrange.modules.attention import KVCache, MultiheadAttention
from longrange.modules.branch import Branch
from longrange.modules.feedforward import FeedForward
from longrange.modules.local_attention import LocalAttention
from longrange.modules.moe import MoE
from longrange.modules.pkm import PKM
from longrange.modules.reversible import ReversibleSequence, SequentialSequence
from longrange.modules.rotary import RotaryEmbedding
from longrange.testing import assert_close, assert_compiles_whole


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 16, generator=gen)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False
    return x, mask


def _compare(module, loss_of, x):
    """The compiled loss and input gradient equal the eager ones."""
    eager_x = x.clone().requires_grad_()
    eager = loss_of(eager_x)
    eager.backward()
    compiled_x = x.clone().requires_grad_()
    compiled = assert_compiles_whole(loss_of, compiled_x)
    assert_close(compiled.detach(), eager.detach(), 1e-5)
    assert_close(compiled_x.grad, eager_x.grad, 1e-4)


def _blocks():
    torch.manual_seed(0)
    return [(Branch(16, FeedForward(16), shifts=(0, 1)), Branch(16, FeedForward(16))) for _ in range(3)]


@pytest.mark.parametrize("stack", [ReversibleSequence, SequentialSequence])
def test_block_stacks_compile_and_agree(stack):
    x, mask = _inputs()
    model = stack(_blocks(), args_route={"mask": (True, True)})
    _compare(model, lambda t: model(t, mask=mask)[0].square().mean(), x)


@pytest.mark.parametrize("stack", [ReversibleSequence, SequentialSequence])
def test_layer_dropout_compiles_and_keeps_a_block(stack):
    x, mask = _inputs()
    model = stack(_blocks(), args_route={"mask": (True, True)}, layer_dropout=1.0).train()
    leaf = x.clone().requires_grad_()
    loss = assert_compiles_whole(lambda t: model(t, mask=mask)[0].square().mean(), leaf)
    # every block dropped by the draw: one is kept all the same, so the output is not x
    assert leaf.grad is not None and not torch.equal(leaf.grad, 2 * x / x.numel())
    assert torch.isfinite(loss)


def test_local_attention_with_padding_compiles_and_agrees():
    x, mask = _inputs()
    local = LocalAttention(window_size=8, causal=True, autopad=True, dim=8)
    q = x.view(2, 24, 2, 8).transpose(1, 2)[..., :21, :].contiguous()
    _compare(local, lambda t: local(t, t, t, input_mask=mask[:, :21]).square().mean(), q)


def test_attention_with_mask_and_cache_compiles_and_agrees():
    x, mask = _inputs()
    torch.manual_seed(0)
    attn = MultiheadAttention(16, heads=2, rotary=RotaryEmbedding(8))
    _compare(attn, lambda t: attn(t, mask=mask).square().mean(), x)

    def cached(t):  # decoding: a prefill, then one position at a time (no gradients)
        cache = KVCache.empty(2, 2, 32, 8, t)
        outs = [attn(t[:, :20], cache=cache)] + [attn(t[:, i : i + 1], cache=cache) for i in range(20, 24)]
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(cached, backend="aot_eager", fullgraph=True)(x)
        assert_close(compiled, cached(x), 1e-5)
        assert_close(compiled, attn(x), 1e-5)


def test_pkm_and_moe_compile_and_agree():
    x, mask = _inputs()
    torch.manual_seed(0)
    pkm = PKM(16, heads=2, num_keys=8, topk=4, dim_head=8)
    _compare(pkm, lambda t: pkm(t, input_mask=mask).square().mean(), x)
    moe = MoE(16, num_experts=4, second_policy_train="all", causal=True).train()

    def moe_loss(t):
        out, aux = moe(t, mask)
        return out.square().mean() + aux

    _compare(moe, moe_loss, x)
    # capacity 4 of 24 tokens per expert: choices are dropped, and still one graph
    assert moe.gate.capacity(24) < 24


def test_moe_dispatch_equals_per_token_experts():
    """Every dispatched choice gets its expert's output times its gate, and nothing else."""
    torch.manual_seed(0)
    x, mask = _inputs(1)
    moe = MoE(16, num_experts=4, second_policy_train="all").train()
    experts, _, gates, keep, _, _ = moe.gate(x, mask)
    out, _ = moe(x, mask)
    w1, w2 = moe.experts.w1, moe.experts.w2
    want = torch.zeros_like(x)
    for bi in range(2):
        for t in range(24):
            for c in range(2):
                if keep[bi, t, c]:
                    e = experts[bi, t, c]
                    hidden = moe.experts.act(x[bi, t] @ w1[e])
                    want[bi, t] += gates[bi, t, c] * (hidden @ w2[e])
    assert_close(out, want, 1e-5)
    assert isinstance(moe.experts.act, nn.Module)
