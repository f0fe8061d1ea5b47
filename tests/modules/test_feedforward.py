import pytest
import torch
from torch import nn

from longrange.modules.feedforward import Chunk, FeedForward, GEGLUFeedForward
from longrange.testing import assert_close, assert_same_forward_backward


@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
def test_feedforward_shapes_and_param_names(glu):
    torch.manual_seed(0)
    ff = FeedForward(16, mult=3, glu=glu)
    assert ff.w1.weight.shape == (16 * 3 * (2 if glu else 1), 16)
    assert ff.w2.weight.shape == (16, 16 * 3)
    x = torch.randn(2, 7, 16)
    assert ff(x, mask=None).shape == (2, 7, 16)


def test_feedforward_matches_hand_written_glu():
    torch.manual_seed(1)
    ff = FeedForward(8, mult=2, activation=nn.ReLU, glu=True)
    x = torch.randn(3, 5, 8)
    a, b = (x @ ff.w1.weight.T + ff.w1.bias).chunk(2, dim=-1)
    expected = (torch.relu(a) * b) @ ff.w2.weight.T + ff.w2.bias
    assert_close(ff(x), expected)


def test_feedforward_activation_instance_and_errors():
    ff = FeedForward(4, activation=nn.Tanh())
    assert isinstance(ff.act, nn.Tanh)
    with pytest.raises(TypeError, match="activation"):
        FeedForward(4, activation=torch.tanh)
    with pytest.raises(ValueError, match="dropout"):
        FeedForward(4, dropout=1.5)
    with pytest.raises(ValueError, match="mult"):
        FeedForward(4, mult=0)


def test_geglu_two_thirds_width():
    ff = GEGLUFeedForward(30, mult=4)
    assert ff.inner_dim == 80
    assert ff.w1.weight.shape == (160, 30) and ff.w1.bias is None
    plain = sum(p.numel() for p in FeedForward(30, mult=4, bias=False).parameters())
    gated = sum(p.numel() for p in ff.parameters())
    assert abs(gated - plain) / plain < 0.01


@pytest.mark.parametrize("chunks,n", [(1, 9), (3, 9), (4, 63), (10, 7)], ids=str)
def test_chunk_equals_unchunked(chunks, n):
    torch.manual_seed(2)
    ff = FeedForward(12, glu=True)
    chunked = Chunk(chunks, ff, along_dim=-2)
    x = torch.randn(2, n, 12, dtype=torch.float64)
    ff.double()
    assert_same_forward_backward(chunked, ff, [x])


def test_chunk_passes_kwargs_and_validates():
    seen = []

    def fn(x, *, tag):
        seen.append(tag)
        return x * 2

    out = Chunk(3, fn)(torch.ones(1, 6, 2), tag="t")
    assert seen == ["t"] * 3 and torch.equal(out, torch.full((1, 6, 2), 2.0))
    with pytest.raises(ValueError, match="chunks"):
        Chunk(0, fn)
    with pytest.raises(TypeError, match="chunks"):
        Chunk(2.0, fn)


def test_lean_path_steps_aside_under_autocast():
    """The lean layer's backward works in the weights' precision, so autocast (HF Trainer's
    bf16) runs the plain layer; a bf16 step trains and matches the plain module's gradients."""
    from longrange.modules.feedforward import lean_applies, lean_feed_forward

    torch.manual_seed(0)
    ff, norm = FeedForward(8, mult=2), nn.LayerNorm(8)
    assert lean_applies(ff, norm)
    x = torch.randn(2, 10, 8)
    grads = []
    for lean in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not lean_applies(ff, norm)
            out = lean_feed_forward(ff, x, norm=norm) if lean and lean_applies(ff, norm) else ff(norm(x))
        grads.append(torch.autograd.grad(out.float().sum(), list(ff.parameters())))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep", ["hidden", "pre", "input"])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_lean_layer_equals_the_plain_layers_whatever_it_keeps(keep, glu, with_norm, approximate, monkeypatch):
    import longrange.modules.feedforward as feedforward

    monkeypatch.setattr(feedforward, "SLICE_ROWS", 4)  # 3 slices of 10 rows
    torch.manual_seed(0)
    ff = FeedForward(6, mult=2, glu=glu, activation=nn.GELU(approximate=approximate)).double()
    assert feedforward.lean_applies(ff)
    norm = nn.LayerNorm(6).double() if with_norm else None
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *ff.parameters(), *(norm.parameters() if norm else [])]
    out = feedforward.lean_feed_forward(ff, x, norm=norm, keep=keep)
    want = ff(norm(x) if norm else x)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    for a, b in zip(got, torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)


def test_lean_geglu_keeping_the_pre_activation_has_exact_gradients():
    from longrange.ops.mlp.chunked import sliced_mlp

    def f64(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def geglu(x, w1, w2):
        return sliced_mlp(x, w1, None, w2, None, activation="gelu", rows=2, keep="pre", glu=True)

    torch.manual_seed(0)
    x, w1, w2 = f64(2, 3, 6), f64(8, 6), f64(5, 4)
    assert torch.autograd.gradcheck(geglu, (x, w1, w2))
    a, b = (x @ w1.T).chunk(2, dim=-1)
    assert_close(geglu(x, w1, w2), (torch.nn.functional.gelu(a) * b) @ w2.T)


def test_lean_layer_without_a_norm_runs_under_autocast():
    from longrange.modules.feedforward import lean_applies, lean_feed_forward

    torch.manual_seed(0)
    ff = GEGLUFeedForward(8, mult=2)
    x = torch.randn(2, 10, 8)
    grads = []
    for lean in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lean_applies(ff)
            out = lean_feed_forward(ff, x, keep="pre") if lean else ff(x)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().sum(), list(ff.parameters())))
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_lean_layer_refuses_an_unknown_keep():
    from longrange.modules.feedforward import lean_feed_forward

    ff, x = FeedForward(4), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="keep must be one of"):
        lean_feed_forward(ff, x, keep="everything")
    with pytest.raises(ValueError, match="recompute=True keeps the input only"):
        lean_feed_forward(ff, x, recompute=True, keep="pre")
