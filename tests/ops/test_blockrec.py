"""ops/blockrec: shared-key/value attention on the fused kernel equals the explicit score
matrix, forward and every input gradient; fully masked rows give zeros, never NaN."""

from __future__ import annotations

import pytest
import torch

from longrange.ops.blockrec import shared_kv_attention, shared_kv_attention_naive, shared_kv_attention_sdpa
from longrange.testing import assert_close, assert_same_forward_backward


def make_inputs(batch, heads, n, m, dim, *, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k, v = torch.randn(2, batch, m, dim, generator=gen)
    return [t.to(dtype) for t in (q, k, v)]


def key_padding(batch, m, *, seed, keep=0.7):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, m, generator=gen) < keep


# (id, batch, heads, n queries, m keys, head dim, causal, padded)
CASES = [
    ("block-no-memory-63", 2, 3, 63, 63, 16, True, False),
    ("block-with-memory-37-of-100", 2, 2, 37, 100, 16, True, False),
    ("block-memory-padding-45-of-77", 2, 2, 45, 77, 8, True, True),
    ("decode-step-1-of-63", 2, 4, 1, 63, 16, True, True),
    ("state-read-50-to-16", 2, 2, 50, 16, 16, False, False),
    ("state-write-16-to-33-padded", 3, 2, 16, 33, 16, False, True),
    ("many-blocks-folded-causal-padded", 5, 3, 16, 32, 8, True, True),
    ("many-blocks-folded-read", 6, 2, 16, 8, 8, False, False),
]


@pytest.mark.parametrize(
    "batch, heads, n, m, dim, causal, padded", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_sdpa_matches_naive(batch, heads, n, m, dim, causal, padded):
    q, k, v = make_inputs(batch, heads, n, m, dim, seed=n + m)
    key_mask = key_padding(batch, m, seed=m) if padded else None

    def run(fn):
        return lambda q, k, v: fn(q, k, v, key_mask=key_mask, causal=causal, scale=0.3)

    assert_same_forward_backward(run(shared_kv_attention_sdpa), run(shared_kv_attention_naive), [q, k, v])


@pytest.mark.parametrize(
    "batch, heads, n, m, dim, causal, padded", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_kept_kernel_outputs_are_recorded_then_taken(batch, heads, n, m, dim, causal, padded):
    """Inside a checkpoint's forward context the call equals the plain one and records the
    kernel's output; inside its recomputation context the same call takes it (the kernel does
    not run) and the backward pass gives the plain call's gradients; a call more than were
    recorded is refused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longrange.ops.blockrec import kept_kernel_contexts

    class KernelCalls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return func(*args, **(kwargs or {}))

    q, k, v = make_inputs(batch, heads, n, m, dim, seed=n + m)
    key_mask = key_padding(batch, m, seed=m) if padded else None
    args = dict(key_mask=key_mask, causal=causal, scale=0.3)
    grad = torch.randn(batch, heads, n, dim, generator=torch.Generator().manual_seed(5))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = shared_kv_attention(*inputs, **args)
    want_grads = torch.autograd.grad(want, inputs, grad)

    recording, replaying = kept_kernel_contexts()
    with recording:
        first = shared_kv_attention(q, k, v, **args)
    assert_close(first, want)
    for _ in range(2):  # a second backward pass recomputes again
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        calls = KernelCalls()
        with replaying, calls:
            again = shared_kv_attention(*inputs, **args)
        assert calls.count == 0 and torch.equal(again, first)
        for got, expected in zip(torch.autograd.grad(again, inputs, grad), want_grads, strict=True):
            assert_close(got, expected)
    with replaying, pytest.raises(RuntimeError, match="more attention calls"):
        shared_kv_attention(q, k, v, **args)
        shared_kv_attention(q, k, v, **args)


def test_shared_head_equals_repeated_heads():
    q, k, v = make_inputs(2, 3, 20, 31, 8, seed=1)
    ours = shared_kv_attention(q, k, v, causal=True)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q,
        k[:, None].expand(-1, 3, -1, -1),
        v[:, None].expand(-1, 3, -1, -1),
        attn_mask=torch.ones(20, 31, dtype=torch.bool).tril(11),
    )
    assert_close(ours, dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("batch", [2, 5], ids=["expanded", "folded"])
def test_fully_masked_rows_are_zero(dtype, backend, batch):
    q, k, v = make_inputs(batch, 2, 9, 9, 8, seed=3, dtype=dtype)
    key_mask = torch.ones(batch, 9, dtype=torch.bool)
    key_mask[0, :4] = False  # causal rows 0..3 of batch 0 have no key
    out = shared_kv_attention(q, k, v, key_mask=key_mask, causal=True, backend=backend)
    assert torch.isfinite(out).all()
    assert out[0, :, :4].abs().max() == 0
    assert out[1].abs().sum() > 0


def test_bad_backend():
    q, k, v = make_inputs(1, 1, 2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="backend"):
        shared_kv_attention(q, k, v, backend="flash")


def test_naive_keeps_float64_inputs_in_float64():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    scores = torch.einsum("bhnd,bmd->bhnm", q, k) * 8**-0.5
    expected = torch.einsum("bhnm,bmd->bhnd", scores.softmax(dim=-1), v)
    out = shared_kv_attention_naive(q, k, v)
    assert out.dtype == torch.float64
    assert (out - expected).abs().max() < 1e-12


def _bad_arguments():
    q, k, v = make_inputs(2, 3, 5, 7, 8, seed=4)
    keys = torch.rand(2, 7) < 0.7
    return [
        ("float-key-mask", dict(key_mask=keys.float()), TypeError, "key_mask"),
        ("key-mask-wrong-length", dict(key_mask=keys[:, :6]), ValueError, "key_mask"),
        ("integer-inputs", dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q must be a floating"),
        ("mixed-dtypes", dict(k=k.double()), TypeError, "share one dtype"),
        ("k-with-heads", dict(k=k[:, None]), ValueError, "k must be 3-D"),
        ("k-narrower-than-q", dict(k=k[..., :4]), ValueError, "must agree"),
        ("v-other-batch", dict(v=v[:1]), ValueError, "must agree"),
        ("nan-scale", dict(scale=float("nan")), ValueError, "scale"),
        ("causal-not-bool", dict(causal="yes"), TypeError, "causal"),
    ], (q, k, v)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("case", range(len(_bad_arguments()[0])), ids=[c[0] for c in _bad_arguments()[0]])
def test_bad_arguments_are_named(backend, case):
    """A float key mask was added to the scores by the fused kernel (a silently wrong answer);
    other wrong arguments failed deep inside torch, or (integer inputs in the reference) gave
    a truncated result."""
    cases, (q, k, v) = _bad_arguments()
    _, changes, error, match = cases[case]
    args = dict(q=q, k=k, v=v, key_mask=None, causal=True, scale=None) | changes
    with pytest.raises(error, match=match):
        shared_kv_attention(**args, backend=backend)
