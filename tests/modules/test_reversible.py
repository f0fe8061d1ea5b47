import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from longrange.modules.feedforward import FeedForward
from longrange.modules.norms import PreNorm
from longrange.modules.reversible import (
    ReversibleSequence,
    SequentialSequence,
    in_recomputation,
)
from longrange.testing import assert_close


class TinyAttention(nn.Module):
    """Causal single-head attention with dropout on the weights; an optional added context."""

    def __init__(self, dim: int, dropout: float = 0.0, aux_coef: float | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.aux_coef = nn.Parameter(torch.tensor(aux_coef)) if aux_coef is not None else None

    def forward(self, x, *, mask=None, context=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if context is not None:
            k = k + context
        sim = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            allowed = allowed & mask[:, None, :]
        sim = sim.masked_fill(~allowed, -1e9)
        out = self.out(self.drop(sim.softmax(dim=-1)) @ v)
        if self.aux_coef is None:
            return out
        return out, out.pow(2).mean() * self.aux_coef


def make_blocks(depth, dim, dropout=0.1, aux=False):
    return [
        (
            PreNorm(dim, TinyAttention(dim, dropout, aux_coef=0.5 if aux else None)),
            PreNorm(dim, FeedForward(dim, mult=2, dropout=dropout)),
        )
        for _ in range(depth)
    ]


ROUTE = {"mask": (True, False), "context": (True, False)}


def run_and_grad(stack, x, seed, **kwargs):
    x = x.detach().clone().requires_grad_()
    kwargs = {
        k: v.detach().clone().requires_grad_() if v.is_floating_point() else v for k, v in kwargs.items()
    }
    torch.manual_seed(seed)
    out, aux = stack(x, **kwargs)
    gen = torch.Generator().manual_seed(99)
    cot = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    (out * cot).sum().add(aux * 3.0).backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    stack.zero_grad(set_to_none=True)
    kw_grads = {k: v.grad for k, v in kwargs.items() if v.is_floating_point()}
    return out.detach(), aux.detach(), x.grad, grads, kw_grads


@pytest.mark.parametrize("aux", [False, True], ids=["no_aux", "aux"])
def test_reversible_gradients_equal_plain_autograd_with_dropout(aux):
    torch.manual_seed(0)
    dim, depth = 16, 4
    rev = ReversibleSequence(make_blocks(depth, dim, 0.2, aux), args_route=ROUTE).double()
    plain = ReversibleSequence(make_blocks(depth, dim, 0.2, aux), args_route=ROUTE, recompute=False)
    plain.double().load_state_dict(rev.state_dict())
    rev.train(), plain.train()
    x = torch.randn(2, 13, dim, dtype=torch.float64)
    mask = torch.rand(2, 13) > 0.2
    mask[:, 0] = True
    context = torch.randn(2, 13, dim, dtype=torch.float64)
    a = run_and_grad(rev, x, 5, mask=mask, context=context)
    b = run_and_grad(plain, x, 5, mask=mask, context=context)
    assert_close(a[0], b[0], rtol=1e-10, name="output")
    assert_close(a[1], b[1], rtol=1e-10, name="aux")
    assert_close(a[2], b[2], rtol=1e-9, name="input grad")
    assert a[3].keys() == b[3].keys() and len(a[3]) == len(list(rev.parameters()))
    for name in a[3]:
        assert_close(a[3][name], b[3][name], rtol=1e-9, name=name)
    assert_close(a[4]["context"], b[4]["context"], rtol=1e-9, name="context grad")
    if aux:
        assert a[1].item() > 0
        assert a[3]["blocks.0.f.fn.aux_coef"].abs().item() > 0


def test_dropout_is_active_and_replayed():
    torch.manual_seed(1)
    rev = ReversibleSequence(make_blocks(2, 8, 0.5)).double().train()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    torch.manual_seed(3)
    first, _ = rev(x)
    torch.manual_seed(4)
    second, _ = rev(x)
    assert (first - second).abs().max() > 1e-3  # dropout really draws masks
    plain = ReversibleSequence(make_blocks(2, 8, 0.5), recompute=False).double().train()
    plain.load_state_dict(rev.state_dict())
    a, b = run_and_grad(rev, x, 7), run_and_grad(plain, x, 7)
    assert_close(a[2], b[2], rtol=1e-9, name="input grad")


def test_float32_gradients_close():
    torch.manual_seed(2)
    rev = ReversibleSequence(make_blocks(6, 16, 0.1))
    plain = ReversibleSequence(make_blocks(6, 16, 0.1), recompute=False)
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(2, 31, 16)
    a, b = run_and_grad(rev, x, 3), run_and_grad(plain, x, 3)
    assert_close(a[2], b[2], rtol=1e-4, name="input grad")
    for name in a[3]:
        assert_close(a[3][name], b[3][name], rtol=1e-4, name=name)


def test_shared_weights_across_blocks():
    torch.manual_seed(3)
    f, g = PreNorm(8, TinyAttention(8)), PreNorm(8, FeedForward(8, mult=2))
    rev = ReversibleSequence([(f, g)] * 3).double()
    plain = ReversibleSequence([(f, g)] * 3, recompute=False).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    a, b = run_and_grad(rev, x, 0), run_and_grad(plain, x, 0)
    for name in a[3]:
        assert_close(a[3][name], b[3][name], rtol=1e-9, name=name)


class SavedTensorMeter:
    """Bytes of the distinct non-parameter storages autograd holds for backward, over time.

    Each saved tensor is packed with a holder object; when autograd frees the holder (CPython
    refcounting makes this immediate and deterministic) its storage stops counting.
    """

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs, self.current, self.peak = {}, 0, 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip:
            return None, t
        if self.refs.get(ptr, 0) == 0:
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        return _Holder(self, ptr, storage.nbytes()), t

    @staticmethod
    def unpack(packed):
        return packed[1]


class _Holder:
    def __init__(self, meter, ptr, nbytes):
        self.meter, self.ptr, self.nbytes = meter, ptr, nbytes

    def __del__(self):
        self.meter.refs[self.ptr] -= 1
        if self.meter.refs[self.ptr] == 0:
            self.meter.current -= self.nbytes


def activation_bytes(stack, x):
    """(bytes held between forward and backward, peak bytes over forward + backward)."""
    meter = SavedTensorMeter(stack.parameters())
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        out, aux = stack(x)
        held = meter.current
        (out.sum() + aux).backward()
    return held, meter.peak


def test_reversible_activation_memory_is_lower_at_depth_12():
    torch.manual_seed(4)
    dim, depth = 32, 12
    x = torch.randn(2, 64, dim, requires_grad=True)
    blocks = make_blocks(depth, dim, 0.1)
    rev_held, rev_peak = activation_bytes(ReversibleSequence(blocks), x)
    plain_held, plain_peak = activation_bytes(ReversibleSequence(blocks, recompute=False), x)
    seq_held, seq_peak = activation_bytes(SequentialSequence(blocks), x)
    # between forward and backward the reversible stack keeps only its two output streams
    assert rev_held == 2 * x.numel() * 4
    # in backward it re-creates one block's activations at a time
    assert rev_peak * 8 < plain_peak and rev_peak * 8 < seq_peak
    print(
        f"\nactivation bytes at depth 12 (held / peak): reversible {rev_held} / {rev_peak}, "
        f"plain coupling {plain_held} / {plain_peak}, sequential {seq_held} / {seq_peak}; "
        f"peak ratio vs plain {rev_peak / plain_peak:.3f}, vs sequential {rev_peak / seq_peak:.3f}"
    )


def test_recomputation_flag_only_during_recomputation():
    calls = []

    class Probe(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            calls.append((self.tag, in_recomputation()))
            return self.lin(x)

    rev = ReversibleSequence([(Probe("f"), Probe("g")), (Probe("f"), Probe("g"))])
    out, _ = rev(torch.randn(1, 3, 4))
    assert calls == [("f", False), ("g", False)] * 2
    calls.clear()
    out.sum().backward()
    assert calls == [("g", True), ("f", True)] * 2
    assert not in_recomputation()
    calls.clear()
    SequentialSequence([(Probe("f"), Probe("g"))])(torch.randn(1, 3, 4))[0].sum().backward()
    assert calls == [("f", False), ("g", False)]


@pytest.mark.parametrize("cls", [SequentialSequence, ReversibleSequence], ids=["seq", "rev"])
def test_layer_dropout_keeps_at_least_one(cls):
    ran = []

    class Count(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            ran.append(self.i)
            return self.lin(x)

    stack = cls([(Count(i), nn.Linear(4, 4)) for i in range(5)], layer_dropout=1.0)
    x = torch.randn(1, 3, 4, requires_grad=True)
    for seed in range(4):
        torch.manual_seed(seed)
        ran.clear()
        stack(x)[0].sum().backward()
        assert len(set(ran)) == 1
    stack.eval()
    ran.clear()
    stack(x)
    assert ran == [0, 1, 2, 3, 4]
    stack.train()
    stack.layer_dropout = 0.5
    torch.manual_seed(0)
    counts = []
    for _ in range(20):
        ran.clear()
        stack(x)
        counts.append(len(set(ran)))
    assert min(counts) >= 1 and max(counts) < 5 and 1 < sum(counts) / 20 < 4


def test_sequential_is_plain_residual_and_shares_state_dict():
    torch.manual_seed(5)
    blocks = make_blocks(2, 8, 0.0, aux=True)
    seq = SequentialSequence(blocks, args_route=ROUTE)
    rev = ReversibleSequence(blocks, args_route=ROUTE)
    assert seq.state_dict().keys() == rev.state_dict().keys()
    x = torch.randn(2, 5, 8)
    expected, aux = x, 0.0
    for f, g in blocks:
        out, a = f(expected)
        expected = expected + out
        expected = expected + g(expected)
        aux = aux + a
    out, total = seq(x)
    assert_close(out, expected)
    assert_close(total, aux)


def test_routing_per_layer_and_errors():
    seen = []

    class Spy(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x, **kwargs):
            seen.append((self.tag, sorted(kwargs)))
            return torch.zeros_like(x)

    blocks = [(Spy("f0"), Spy("g0")), (Spy("f1"), Spy("g1"))]
    route = {"mask": (True, False), "context": ((False, False), (True, True))}
    seq = SequentialSequence(blocks, args_route=route)
    seq(torch.randn(1, 2, 3), mask=1, context=2)
    assert seen == [("f0", ["mask"]), ("g0", []), ("f1", ["context", "mask"]), ("g1", ["context"])]
    with pytest.raises(TypeError, match="pos_emb"):
        seq(torch.randn(1, 2, 3), pos_emb=1)
    with pytest.raises(ValueError, match="entries"):
        SequentialSequence(blocks, args_route={"mask": ((True, False),)})
    with pytest.raises(ValueError, match="args_route"):
        SequentialSequence(blocks, args_route={"mask": "f"})
    with pytest.raises(ValueError, match="layer_dropout"):
        SequentialSequence(blocks, layer_dropout=1.5)
    with pytest.raises(TypeError, match="blocks"):
        SequentialSequence([(Spy("f"),)])
    # "no" was truthy: the stack recomputed what the caller asked it to keep, silently
    with pytest.raises(TypeError, match="recompute must be True or False, got 'no'"):
        ReversibleSequence(blocks, recompute="no")


def test_bad_branch_output_raises():
    class Bad(nn.Module):
        def forward(self, x):
            return x, torch.ones(3)

    with pytest.raises(TypeError, match="scalar"):
        SequentialSequence([(Bad(), nn.Identity())])(torch.randn(1, 2, 3))


def test_no_grad_path_matches():
    torch.manual_seed(6)
    rev = ReversibleSequence(make_blocks(3, 8, 0.0)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        a, _ = rev(x)
    b, _ = rev(x.requires_grad_())
    assert_close(a, b.detach(), rtol=1e-6)
    assert F.mse_loss(a, b.detach()).item() < 1e-10


def test_autocast_state_is_replayed():
    torch.manual_seed(7)
    rev = ReversibleSequence(make_blocks(3, 16, 0.1))
    plain = ReversibleSequence(make_blocks(3, 16, 0.1), recompute=False)
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = run_and_grad(rev, x, 1), run_and_grad(plain, x, 1)
    assert_close(a[0], b[0], rtol=1e-6, name="output")
    assert_close(a[2], b[2], rtol=1e-5, name="input grad")
    for name in a[3]:
        assert_close(a[3][name], b[3][name], rtol=1e-5, name=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_replay():
    torch.manual_seed(8)
    rev = ReversibleSequence(make_blocks(3, 16, 0.3)).cuda().double()
    plain = ReversibleSequence(make_blocks(3, 16, 0.3), recompute=False).cuda().double()
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64, device="cuda")
    a, b = run_and_grad(rev, x, 2), run_and_grad(plain, x, 2)
    assert_close(a[2], b[2], rtol=1e-9, name="input grad")


class _Broadcast(nn.Module):
    """A branch whose result broadcasts against the stream: a learned [1, 1, D] shift."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, 1, dim, dtype=torch.float64))

    def forward(self, x):
        return self.shift * 2.0


def test_a_branch_result_that_broadcasts_gets_the_plain_stacks_gradients():
    """Backward handed the stream's [B, N, D] gradient to the branch's [1, 1, D] result (a
    shape mismatch deep in autograd) where plain autograd sums it over the broadcast."""
    torch.manual_seed(4)
    rev = ReversibleSequence([(_Broadcast(8), PreNorm(8, FeedForward(8, mult=2)))] * 2).double()
    plain = ReversibleSequence([(b.f, b.g) for b in rev.blocks], recompute=False)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    a, b = run_and_grad(rev, x, 1), run_and_grad(plain, x, 1)
    assert_close(a[0], b[0], rtol=1e-12, name="output")
    assert_close(a[2], b[2], rtol=1e-9, name="input grad")
    for name in b[3]:
        assert_close(a[3][name], b[3][name], rtol=1e-9, name=name)


def test_tensors_needing_gradients_inside_a_keyword_container_are_refused():
    """They were passed to the branches detached in backward: their gradients silently None
    where the plain stack gives them."""
    torch.manual_seed(5)
    rev = ReversibleSequence(make_blocks(1, 8, 0.0), args_route={"context": (True, False)}).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"'context'.*keyword of its own"):
        rev(x, context=[context])
