"""ops/shared_kv: attention of many query heads against one shared key/value head with a
Toeplitz bias. The blocked form (blocks of query positions as GEMM rows, keys a causal bias
hides skipped, extra logits in the same softmax) equals the full score matrix, forward and
every gradient (the bias values' included); its diagonal sums (compiled and torch) equal a
plain loop; bad input is refused before any work."""

from __future__ import annotations

import types

import pytest
import torch

from longrange.ops.dense.bias import ToeplitzBias
from longrange.ops.shared_kv import blocked as blocked_module
from longrange.ops.shared_kv import diagonal as diagonal_module
from longrange.ops.shared_kv import (
    diagonal_sums,
    diagonal_sums_torch,
    shared_kv_attention,
    shared_kv_attention_blocked,
    shared_kv_attention_naive,
)
from longrange.ops.shared_kv import naive as naive_module
from longrange.testing import assert_close, assert_same_forward_backward


def _inputs(b, h, n, m, d, k, causal, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=gen, dtype=dtype).transpose(1, 2)  # as the projection splits it
    keys, values = (torch.randn(b, m, d, generator=gen, dtype=dtype) for _ in range(2))
    table = torch.randn(h, n + m - 1, generator=gen, dtype=dtype)
    if causal:  # the key minus the query position above m - n: the future
        future = torch.arange(n + m - 1) > m - 1
        table = table.masked_fill(future, -torch.finfo(dtype).max)
    memory = torch.randn(b, h, n, k, generator=gen, dtype=dtype) if k else None
    return q, keys, values, table, memory


def _joined(fn, n, m, causal, **keywords):
    """fn's outputs as one tensor (the output, then the memory weights)."""

    def run(q, keys, values, table, memory=None):
        out, weights = fn(
            q, keys, values, ToeplitzBias(table, n, m, causal=causal), memory_logits=memory, **keywords
        )
        return out if weights is None else torch.cat([out, weights], dim=-1)

    return run


CASES = {
    "chunk": (1, 4, 64, 64, 16, 0, True),
    "xl-keys-memory": (2, 3, 63, 100, 8, 5, True),
    "one-query": (1, 2, 1, 40, 8, 3, True),
    "not-causal": (2, 2, 50, 50, 8, 0, False),
    "one-head": (1, 1, 37, 37, 8, 4, True),
    "more-queries-than-a-block": (1, 2, 45, 45, 4, 2, True),
}


@pytest.mark.parametrize("block_rows", [8, 30, 4096], ids=["small-blocks", "odd-blocks", "one-block"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blocked_equals_naive(case, block_rows):
    _, _, n, m, _, _, causal = case
    inputs = [t for t in _inputs(*case) if t is not None]

    def blocked(q, keys, values, table, memory=None):
        out, weights = shared_kv_attention_blocked(
            q,
            keys,
            values,
            table,
            ToeplitzBias(table, n, m).rows(),
            scale=0.3,
            causal=causal,
            memory_logits=memory,
            block_rows=block_rows,
        )
        return out if weights is None else torch.cat([out, weights], dim=-1)

    naive = _joined(shared_kv_attention_naive, n, m, causal, scale=0.3)
    assert_same_forward_backward(blocked, naive, inputs)


def _key_mask(kind: str, b: int, n: int, m: int) -> torch.Tensor:
    mask = torch.ones(b, m, dtype=torch.bool)
    if kind == "left-padding":  # row 0's first queries see no real key: their blocks read all
        mask[0, : m - n + 11] = False
    elif kind == "hidden-window":  # a document start: the earlier keys hidden
        mask[-1, : m - n] = False
    elif kind == "right-padding":
        mask[0, m - 7 :] = False
    elif kind == "scattered":
        mask = torch.rand(b, m, generator=torch.Generator().manual_seed(3)) > 0.4
    elif kind == "all-hidden":
        mask[0] = False
    return mask


MASKED = {
    "xl-keys-memory": (2, 3, 63, 100, 8, 5, True),
    "chunk-local": (2, 2, 40, 40, 8, 0, True),
    "not-causal": (2, 2, 30, 30, 8, 3, False),
}


MASK_KINDS = ["left-padding", "hidden-window", "right-padding", "scattered", "all-hidden"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("case", MASKED.values(), ids=MASKED.keys())
def test_blocked_equals_naive_with_a_key_mask(case, kind):
    """Hidden keys score the most negative finite number in both forms, forward and every
    gradient; a query that sees no real key gets the naive form's equal weights over every key
    (its block reads them all), in blocks of 4 positions at 2-3 heads."""
    b, _, n, m, _, _, causal = case
    mask = _key_mask(kind, b, n, m)
    inputs = [t for t in _inputs(*case) if t is not None]
    blocked = _joined(shared_kv_attention, n, m, causal, scale=0.3, key_mask=mask, backend="blocked")
    naive = _joined(shared_kv_attention_naive, n, m, causal, scale=0.3, key_mask=mask)
    assert_same_forward_backward(blocked, naive, inputs)


def test_blocked_with_a_key_mask_in_small_blocks():
    """Blocks of 2 positions: the first blocks (queries with no real key) read every key, the
    later ones skip the keys after them, and both agree with the naive form."""
    case = (2, 2, 24, 30, 4, 3, True)
    mask = _key_mask("left-padding", 2, 24, 30)
    inputs = [t for t in _inputs(*case) if t is not None]

    def blocked(q, keys, values, table, memory):
        out, weights = shared_kv_attention_blocked(
            q,
            keys,
            values,
            table,
            ToeplitzBias(table, 24, 30).rows(),
            scale=0.3,
            causal=True,
            memory_logits=memory,
            key_mask=mask,
            block_rows=4,
        )
        return torch.cat([out, weights], dim=-1)

    naive = _joined(shared_kv_attention_naive, 24, 30, True, scale=0.3, key_mask=mask)
    assert_same_forward_backward(blocked, naive, inputs)


DROPOUT_CASES = {
    "memory": ((2, 3, 21, 33, 8, 5, True), None),
    "local": ((1, 2, 24, 24, 4, 0, True), None),
    "memory-left-padding": ((2, 3, 21, 33, 8, 5, True), "left-padding"),
    "local-left-padding": ((2, 2, 24, 24, 4, 0, True), "left-padding"),
}


@pytest.mark.parametrize("case, kind", DROPOUT_CASES.values(), ids=DROPOUT_CASES.keys())
def test_blocked_dropout_equals_naive_with_the_same_masks(monkeypatch, case, kind):
    """Attention dropout: with the keep masks of the naive form's weights handed to the blocked
    form block by block (blocks of 3 positions), outputs, memory weights and every gradient
    agree; the kept weights are scaled by 1 / (1 - rate) in both. Also with key padding whose
    first queries see no real key (their blocks read every key)."""
    b, h, n, m, _, k, causal = case
    rate = 0.3
    full = torch.rand(b, h, n, k + m, generator=torch.Generator().manual_seed(5)) >= rate
    key_mask = None if kind is None else _key_mask(kind, b, n, m)
    bare = [0] * b if key_mask is None else blocked_module._bare_queries(key_mask, n, m)
    assert key_mask is None or bare[0] > 3  # a bare block, then skipping ones
    inputs = [t for t in _inputs(*case) if t is not None]
    block = 3

    def blocked(*args):
        order = iter(
            [
                (i, a, z, e)
                for i in range(b)
                for a, z, e in blocked_module._blocks(n, m, block, causal, bare[i])
            ]
        )

        def handed(weights, given_rate):
            assert given_rate == rate
            i, a, z, e = next(order)
            return full[i, :, a:z, : k + e].transpose(0, 1).reshape(weights.shape)

        monkeypatch.setattr(blocked_module, "keep_mask", handed)
        return _joined(
            shared_kv_attention_blocked_rows, n, m, causal, block=block, dropout=rate, key_mask=key_mask
        )(*args)

    def naive(*args):
        fake = types.SimpleNamespace(dropout=lambda w, p: w * full.to(w.dtype) / (1 - p))
        monkeypatch.setattr(naive_module, "F", fake)
        return _joined(shared_kv_attention_naive, n, m, causal, scale=0.3, dropout=rate, key_mask=key_mask)(
            *args
        )

    assert_same_forward_backward(blocked, naive, inputs)


def shared_kv_attention_blocked_rows(q, keys, values, bias, *, block, **keywords):
    """The blocked form called with a ToeplitzBias, as the dispatcher calls it."""
    return shared_kv_attention_blocked(
        q,
        keys,
        values,
        bias.values,
        bias.rows(),
        scale=0.3,
        causal=bias.causal,
        block_rows=block * q.shape[1],
        **keywords,
    )


def test_dropout_drops_in_both_forms_and_is_checked():
    q, keys, values, table, memory = _inputs(1, 2, 40, 40, 8, 3, True)
    bias = ToeplitzBias(table, 40, 40, causal=True)
    for backend in ("blocked", "naive"):
        plain, _ = shared_kv_attention(q, keys, values, bias, memory_logits=memory, backend=backend)
        dropped, _ = shared_kv_attention(
            q, keys, values, bias, memory_logits=memory, dropout=0.5, backend=backend
        )
        assert not torch.allclose(plain, dropped) and torch.isfinite(dropped).all()
    for rate in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            shared_kv_attention(q, keys, values, bias, dropout=rate)


@pytest.mark.parametrize("k", [0, 32], ids=["local", "with-memory"])
def test_auto_float32_at_the_chunk_size(k):
    """The size the Memorizing Transformer runs (4 heads, 512 tokens), float32: the compiled
    diagonal sums give the bias gradient."""
    inputs = [t for t in _inputs(1, 4, 512, 512, 64, k, True, dtype=torch.float32) if t is not None]
    fast = _joined(shared_kv_attention, 512, 512, True, scale=0.125)
    naive = _joined(shared_kv_attention_naive, 512, 512, True, scale=0.125)
    assert_same_forward_backward(fast, naive, inputs)


def test_unused_memory_weights_and_inputs_without_gradients():
    q, keys, values, table, memory = _inputs(2, 3, 20, 30, 8, 4, True)
    q.requires_grad_()
    memory.requires_grad_()
    bias = ToeplitzBias(table, 20, 30, causal=True)
    grad = torch.randn(2, 20, 3, 8, dtype=torch.float64)
    for backend in ("blocked", "naive"):
        out, _ = shared_kv_attention(q, keys, values, bias, memory_logits=memory, backend=backend)
        got = torch.autograd.grad(out, (q, memory), grad)
        if backend == "blocked":
            fast = got
    assert_close(fast[0], got[0], name="q")
    assert_close(fast[1], got[1], name="memory")


def test_causal_bias_hides_later_keys():
    """The keys after a block of queries are skipped, not weighted by zero: NaN values there
    (blocks of 5 positions at 2 heads; poisoned from position 10 on) leave the first two
    blocks' outputs exactly as they were."""
    q, keys, values, table, memory = _inputs(1, 2, 24, 24, 8, 3, True)
    bias = ToeplitzBias(table, 24, 24, causal=True)
    out, _ = shared_kv_attention_blocked(
        q, keys, values, table, bias.rows(), causal=True, memory_logits=memory, block_rows=10
    )
    keys2, values2 = keys.clone(), values.clone()
    keys2[:, 10:] = 1e3
    values2[:, 10:] = float("nan")
    out2, _ = shared_kv_attention_blocked(
        q, keys2, values2, table, bias.rows(), causal=True, memory_logits=memory, block_rows=10
    )
    assert torch.equal(out[:, :10], out2[:, :10]) and out2[:, 10:].isnan().any()


def test_autocast_bfloat16_matches_naive():
    q, keys, values, table, memory = _inputs(1, 4, 64, 64, 16, 8, True, dtype=torch.float32)
    bias = ToeplitzBias(table, 64, 64, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_w = shared_kv_attention(q, keys, values, bias, memory_logits=memory)
        naive, naive_w = shared_kv_attention(q, keys, values, bias, memory_logits=memory, backend="naive")
    assert fast.dtype == torch.bfloat16 and torch.isfinite(fast).all()
    assert_close(fast.float(), naive.float(), 2e-2)
    assert_close(fast_w.float(), naive_w.float(), 2e-2)


def _diagonal_loop(grad, heads, first, n, out):
    p = grad.shape[0] // heads
    for i in range(p):
        for h in range(heads):
            for j in range(grad.shape[1]):
                out[h, j - (first + i) + n - 1] += grad[i * heads + h, j]


@pytest.mark.parametrize(
    "p,heads,e,first,n", [(5, 3, 9, 2, 12), (1, 1, 1, 0, 1), (8, 4, 17, 0, 8), (3, 2, 40, 7, 10)]
)
def test_diagonal_sums_equal_a_loop(p, heads, e, first, n):
    gen = torch.Generator().manual_seed(p * e)
    wide = torch.randn(p * heads, e + 3, generator=gen)
    grad = wide[:, 3:]  # a row stride wider than the row
    length = n + max(e, n - first) + 2
    want = torch.randn(heads, length, generator=gen, dtype=torch.float64)
    compiled, plain = want.float().clone(), want.float().clone()
    _diagonal_loop(grad.double(), heads, first, n, want)
    diagonal_sums(grad, heads, first, n, compiled)
    diagonal_sums_torch(grad, heads, first, n, plain)
    assert_close(compiled, want.float(), 1e-6, name="compiled")
    assert_close(plain, want.float(), 1e-6, name="torch")
    assert (
        diagonal_module.compiled_available() or diagonal_module.LIBRARY.unavailable
    )  # a failed build says why


def test_diagonal_sums_refuse_a_block_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit n=4"):
        diagonal_sums(torch.zeros(6, 3), 2, 2, 4, torch.zeros(2, 10))


def _refused_call(change: dict, error: type, match: str) -> None:
    """shared_kv_attention on small valid arguments with ``change`` applied raises ``error``."""
    args = {
        "q": torch.zeros(1, 2, 5, 4),
        "keys": torch.zeros(1, 7, 4),
        "values": torch.zeros(1, 7, 4),
        "bias": ToeplitzBias(torch.zeros(2, 11), 5, 7),
        "memory_logits": None,
        "key_mask": None,
        "backend": "auto",
    } | change
    with pytest.raises(error, match=match):
        shared_kv_attention(
            args["q"],
            args["keys"],
            args["values"],
            args["bias"],
            memory_logits=args["memory_logits"],
            key_mask=args["key_mask"],
            backend=args["backend"],
        )


@pytest.mark.parametrize(
    "change, match",
    [
        ({"q": torch.zeros(2, 5, 4)}, r"q must be \[B, H, N, D\]"),
        ({"keys": torch.zeros(1, 7, 3)}, r"keys must be \[B=1, M, D=4\]"),
        ({"values": torch.zeros(1, 6, 4)}, "keys and values must have the same M"),
        ({"bias": torch.zeros(2, 5, 8)}, r"bias must be \[H=2 or 1, N=5, M=7\]"),
        ({"memory_logits": torch.zeros(1, 2, 4, 3)}, r"memory_logits must be \[B=1, H=2, N=5, K\]"),
        ({"backend": "flash"}, "backend must be one of"),
        ({"key_mask": torch.ones(1, 7)}, r"key_mask must be a bool tensor \[B=1, M=7\], got torch.float32"),
        ({"key_mask": torch.ones(1, 5, dtype=torch.bool)}, r"key_mask must be a bool tensor \[B=1, M=7\]"),
        (
            {"backend": "blocked", "bias": torch.zeros(2, 5, 7)},
            "backend='blocked' needs the bias as a ToeplitzBias",
        ),
    ],
    ids=["q", "keys", "values", "bias", "memory", "backend", "mask-dtype", "mask-shape", "blocked-dense"],
)
def test_bad_input_is_refused(change, match):
    _refused_call(change, ValueError, match)


@pytest.mark.parametrize("backend", ["naive", "blocked"])
@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": torch.zeros(1, 2, 5, 4, dtype=torch.long)}, TypeError, "q must be a floating-point tensor"),
        ({"keys": torch.zeros(1, 7, 4, dtype=torch.float64)}, TypeError, "must share one dtype"),
        ({"memory_logits": torch.zeros(1, 2, 5)}, ValueError, r"memory_logits must be \[B=1, H=2, N=5, K\]"),
        ({"memory_logits": torch.zeros(1, 2, 5, 3, 1)}, ValueError, "memory_logits must be"),
        (
            {"memory_logits": torch.zeros(1, 2, 5, 3, dtype=torch.long)},
            TypeError,
            "memory_logits must be a float",
        ),
    ],
    ids=["integer-q", "mixed-dtypes", "memory-3d", "memory-5d", "memory-integer"],
)
def test_wrong_dtypes_and_memory_ranks_are_named(backend, change, error, match):
    """These failed deep in torch (an index error, a dtype mismatch in a GEMM), or, mixed
    dtypes, ran in one backend and failed in the other; integer memory logits were taken."""
    _refused_call({"backend": backend} | change, error, match)


@pytest.mark.parametrize("backend", ["auto", "naive", "blocked"])
def test_an_empty_batch_gives_an_empty_output(backend):
    """The naive form (what auto runs below BLOCKED_FROM queries) failed on an ambiguous view of
    zero elements."""
    q, keys, values, table, memory = _inputs(0, 2, 5, 7, 4, 3, causal=True)
    out, weights = shared_kv_attention(
        q, keys, values, ToeplitzBias(table, 5, 7), memory_logits=memory, backend=backend
    )
    assert out.shape == (0, 5, 2, 4) and weights.shape == (0, 5, 2, 3)


@pytest.mark.parametrize("n", [4, 1], ids=["queries", "one-query"])
def test_toeplitz_bias_rows_and_dense_agree(n):
    values = torch.randn(3, n + 5, dtype=torch.float64, requires_grad=True)
    bias = ToeplitzBias(values, n, 6, causal=True)
    assert bias.dense() is bias.dense() and bias.rows() is bias.rows()  # built once
    assert torch.equal(bias.rows(), bias.dense().detach().permute(1, 0, 2))
    assert not bias.rows().requires_grad and bias.dense().requires_grad
    with pytest.raises(ValueError, match=r"values must be \[H, n \+ m - 1\]"):
        ToeplitzBias(torch.zeros(9), 4, 6)


def test_diagonal_sums_that_cannot_be_built_say_why_once_and_torch_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(diagonal_module.LIBRARY, "library", None)
    monkeypatch.setattr(diagonal_module.LIBRARY, "unavailable", None)
    grad = torch.randn(6, 5)
    want, got = torch.zeros(2, 9), torch.zeros(2, 9)
    with pytest.warns(RuntimeWarning, match="compiled diagonal sums are unavailable .*compiler"):
        diagonal_sums(grad, 2, 0, 3, got)
    assert not diagonal_module.compiled_available() and "compiler" in diagonal_module.LIBRARY.unavailable
    _diagonal_loop(grad, 2, 0, 3, want)
    assert_close(got, want, 1e-6)


def test_auto_takes_the_blocked_form_from_blocked_from_queries(monkeypatch):
    import longrange.ops.shared_kv as shared_kv

    calls = []
    blocked = shared_kv.shared_kv_attention_blocked
    monkeypatch.setattr(
        shared_kv, "shared_kv_attention_blocked", lambda *a, **k: calls.append(1) or blocked(*a, **k)
    )
    for n in (shared_kv.BLOCKED_FROM - 1, shared_kv.BLOCKED_FROM):
        q, keys, values, table, _ = _inputs(1, 2, n, n + 4, 8, 0, True)
        shared_kv_attention(q, keys, values, ToeplitzBias(table, n, n + 4, causal=True))
    assert calls == [1]  # only the second call
    dense = ToeplitzBias(table, n, n + 4, causal=True).dense()  # a plain tensor bias: naive
    shared_kv_attention(q, keys, values, dense)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocked_on_cuda_equals_naive_on_cpu():
    """auto keeps GPUs on the naive form (unmeasured there); the blocked form still has to be
    right on them (its diagonal sums take the torch path)."""
    inputs = [t for t in _inputs(2, 4, 70, 90, 16, 8, True) if t is not None]

    def blocked_on_cuda(*tensors):
        out = _joined(shared_kv_attention, 70, 90, True, scale=0.3, backend="blocked")(
            *(t.cuda() for t in tensors)
        )
        return out.cpu()

    assert_same_forward_backward(
        blocked_on_cuda, _joined(shared_kv_attention_naive, 70, 90, True, scale=0.3), inputs
    )
    q, keys, values, table, memory = (t.cuda() for t in inputs)
    calls = []
    import longrange.ops.shared_kv as shared_kv

    original = shared_kv.shared_kv_attention_blocked
    shared_kv.shared_kv_attention_blocked = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        shared_kv_attention(q, keys, values, ToeplitzBias(table, 70, 90, causal=True), memory_logits=memory)
    finally:
        shared_kv.shared_kv_attention_blocked = original
    assert not calls  # auto: the naive form on a GPU
