"""LocalAttention equals the ``local-attention`` package (1.11.2) on the same q, k, v: outputs and
input gradients, rotary positions within windows included."""

from __future__ import annotations

import pytest
import torch

from longrange.modules.local_attention import LocalAttention
from longrange.testing import assert_close, assert_same_forward_backward

reference = pytest.importorskip("local_attention")

WINDOW = 8


def make_qkv(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(3)]


def scattered_padding(batch, n):
    """A padding mask that leaves every window (and every partial last window) some key."""
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, 1::5] = False
    mask[-1, 3::7] = False
    mask[:, ::WINDOW] = True  # a causal query first in its window sees only its own key
    return mask


def same_as_reference(kwargs, *, n=61, heads=2, mask=True, seed=0, forward_kwargs=None):
    q, k, v = make_qkv(2, heads, n, 16, seed=seed)
    forward_kwargs = dict(forward_kwargs or {})
    if mask:
        forward_kwargs["mask"] = scattered_padding(2, n)
    ours = LocalAttention(WINDOW, **kwargs).eval()
    theirs = reference.LocalAttention(WINDOW, **kwargs).eval()
    assert_same_forward_backward(
        lambda q, k, v: ours(q, k, v, **forward_kwargs),
        lambda q, k, v: theirs(q, k, v, **forward_kwargs),
        [q, k, v],
    )


GEOMETRIES = [(False, lb, lf) for lb in range(3) for lf in range(3)] + [(True, lb, 0) for lb in range(3)]


@pytest.mark.parametrize(
    "geometry",
    GEOMETRIES,
    ids=lambda g: f"{'causal' if g[0] else 'bidir'}-back{g[1]}-fwd{g[2]}",
)
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rotary", "rotary"])
def test_matches_reference_with_autopad(geometry, rotary):
    causal, back, fwd = geometry
    kwargs = dict(causal=causal, look_backward=back, look_forward=fwd, autopad=True)
    if rotary:
        kwargs["dim"] = 16
    same_as_reference(kwargs, seed=back * 3 + fwd)


OPTION_CASES = [
    ("default-look-forward", dict(autopad=True)),
    ("shared-qk-causal", dict(causal=True, shared_qk=True, autopad=True, dim=16)),
    ("shared-qk-bidir", dict(shared_qk=True, look_forward=1)),
    ("exact-causal", dict(causal=True, look_backward=2, exact_windowsize=True)),
    ("exact-bidir", dict(look_backward=1, look_forward=2, exact_windowsize=True)),
    ("xpos-causal", dict(causal=True, dim=16, use_xpos=True, autopad=True)),
    ("xpos-bidir-base", dict(dim=16, use_xpos=True, xpos_scale_base=3.0)),
    ("rel-pos-emb-config", dict(causal=True, rel_pos_emb_config=(16, 2))),
    ("rotary-off", dict(causal=True, dim=16, use_rotary_pos_emb=False)),
    ("scale", dict(causal=True, scale=0.5, dim=16)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_matches_reference_options(kwargs):
    n = 61 if kwargs.get("autopad") else 64
    same_as_reference(kwargs, n=n, seed=len(kwargs))


def test_attn_bias_matches_reference():
    bias = torch.randn(2, WINDOW, 3 * WINDOW, generator=torch.Generator().manual_seed(3))
    same_as_reference(dict(look_forward=1, dim=16), n=64, forward_kwargs={"attn_bias": bias})


def test_flattened_heads_and_input_mask_match_reference():
    q, k, v = make_qkv(6, 40, 16, seed=4)  # [B * H, N, D] with B = 2
    mask = scattered_padding(2, 40)
    ours = LocalAttention(WINDOW, causal=True, dim=16)
    theirs = reference.LocalAttention(WINDOW, causal=True, dim=16)
    out = ours(q, k, v, input_mask=mask)
    assert out.shape == (6, 40, 16)
    assert_close(out, theirs(q, k, v, input_mask=mask))
    assert_close(ours(*(t.view(2, 3, 40, 16) for t in (q, k, v)), mask=mask), out.view(2, 3, 40, 16))


def test_window_size_override_with_xpos_matches_reference():
    kwargs = dict(causal=True, dim=16, use_xpos=True)
    same_as_reference(kwargs, n=48, mask=False, forward_kwargs={"window_size": 16})


def test_autopad_masks_padding_where_reference_attends_zeros():
    """Non-causal autopad: the padded keys are masked here, as the package does only when it is
    given a mask; so ours without a mask equals the package with an all-True mask."""
    q, k, v = make_qkv(1, 2, 61, 16, seed=7)
    ours = LocalAttention(WINDOW, autopad=True, dim=16)
    theirs = reference.LocalAttention(WINDOW, autopad=True, dim=16)
    everything = torch.ones(1, 61, dtype=torch.bool)
    assert_close(ours(q, k, v), theirs(q, k, v, mask=everything))


def test_fast_backend_equals_naive_backend():
    q, k, v = make_qkv(2, 2, 75, 16, seed=9)
    mask = scattered_padding(2, 75)
    kwargs = dict(causal=True, look_backward=2, shared_qk=True, autopad=True, dim=16)
    fast, naive = LocalAttention(WINDOW, **kwargs), LocalAttention(WINDOW, backend="naive", **kwargs)
    assert_same_forward_backward(
        lambda q, k, v: fast(q, k, v, mask=mask), lambda q, k, v: naive(q, k, v, mask=mask), [q, k, v]
    )


@pytest.mark.parametrize("xpos", [False, True], ids=["rotary", "xpos"])
def test_step_equals_forward(xpos):
    kwargs = dict(causal=True, dim=16, use_xpos=xpos, exact_windowsize=True, autopad=True)
    layer = LocalAttention(WINDOW, **kwargs)
    q, k, v = make_qkv(1, 2, 27, 16, seed=10)
    full = layer(q, k, v)
    keep = layer.cache_length
    rows = []
    for p in range(27):
        start = max(0, p + 1 - keep)
        window = (q[:, :, p : p + 1], k[:, :, start : p + 1], v[:, :, start : p + 1])
        rows.append(layer.step(*window, position=p))
    assert_close(torch.cat(rows, dim=-2), full)


def test_dropout_only_in_training():
    q, k, v = make_qkv(1, 2, 32, 16, seed=11)
    layer = LocalAttention(WINDOW, causal=True, dropout=0.5)
    plain = LocalAttention(WINDOW, causal=True)
    assert_close(layer.eval()(q, k, v), plain(q, k, v))
    torch.manual_seed(0)
    assert not torch.allclose(layer.train()(q, k, v), plain(q, k, v))


BAD = [
    ("look_forward", dict(causal=True, look_forward=1)),
    ("window_size", dict(window_size=0)),
    ("dropout", dict(dropout=1.0)),
    ("use_xpos", dict(use_xpos=True)),
    ("xpos_scale_base", dict(dim=16, xpos_scale_base=4.0, use_xpos=True, use_rotary_pos_emb=False)),
    ("backend", dict(backend="cuda")),
]


@pytest.mark.parametrize("word, kwargs", BAD, ids=[b[0] for b in BAD])
def test_constructor_rejects_keywords_it_cannot_honour(word, kwargs):
    kwargs = {"window_size": WINDOW, **kwargs}
    with pytest.raises(ValueError, match=word):
        LocalAttention(**kwargs)


def test_forward_rejects_bad_input():
    q, k, v = make_qkv(1, 2, 30, 16, seed=0)
    layer = LocalAttention(WINDOW)
    with pytest.raises(ValueError, match="autopad"):
        layer(q, k, v)
    with pytest.raises(ValueError, match="window_size"):
        LocalAttention(WINDOW, autopad=True)(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="mask"):
        LocalAttention(WINDOW, autopad=True)(q, k, v, mask=torch.ones(3, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match="step"):
        LocalAttention(WINDOW).step(q[:, :, :1], k[:, :, :1], v[:, :, :1], position=0)
