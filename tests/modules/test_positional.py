import math

import pytest
import torch

from longrange.modules.positional import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
    T5RelativePositionBias,
    t5_relative_position_bucket,
)
from longrange.testing import assert_close


def test_fixed_sinusoidal_values_and_offset():
    pe = FixedPositionalEmbedding(8, 50)
    x = torch.zeros(2, 7, 8)
    out = pe(x)
    assert out.shape == (1, 7, 8)
    pos, freq_index = 5, 1
    angle = pos / 10000 ** (2 * freq_index / 8)
    assert math.isclose(out[0, pos, freq_index].item(), math.sin(angle), abs_tol=1e-6)
    assert math.isclose(out[0, pos, 4 + freq_index].item(), math.cos(angle), abs_tol=1e-6)
    assert torch.equal(pe(x, offset=3)[0, :4], out[0, 3:7])
    assert pe(x.bfloat16()).dtype == torch.bfloat16
    assert "emb" not in pe.state_dict()
    with pytest.raises(ValueError, match="max_seq_len"):
        pe(torch.zeros(1, 51, 8))
    with pytest.raises(ValueError, match="dim"):
        FixedPositionalEmbedding(7, 10)


def test_learned_absolute_embedding():
    torch.manual_seed(0)
    pe = AbsolutePositionalEmbedding(4, 10)
    x = torch.zeros(3, 6, dtype=torch.long)
    assert torch.equal(pe(x), pe.emb.weight[None, :6])
    assert torch.equal(pe(x, offset=4)[0], pe.emb.weight[4:10])
    pe(x).sum().backward()
    assert pe.emb.weight.grad[:6].eq(1).all() and pe.emb.weight.grad[6:].eq(0).all()
    with pytest.raises(ValueError, match="offset"):
        pe(x, offset=-1)


@pytest.mark.parametrize("shape,dims", [((4, 8), None), ((4, 8), (6, 10)), ((2, 3, 5), None)], ids=str)
def test_axial_factorisation(shape, dims):
    torch.manual_seed(1)
    pe = AxialPositionalEmbedding(16, shape, dims)
    n = math.prod(shape) - 3
    out = pe(torch.zeros(2, n, 16))
    assert out.shape == (1, n, 16)
    # position p has row-major coordinates over shape
    p = n - 1
    coords = []
    for size in reversed(shape):
        coords.append(p % size)
        p //= size
    coords = coords[::-1]
    vecs = [w.reshape(size, -1)[c] for w, size, c in zip(pe.weights, shape, coords)]
    expected = sum(vecs) if dims is None else torch.cat(vecs)
    assert_close(out[0, -1], expected)


def test_axial_matches_reference_package():
    ref_mod = pytest.importorskip("axial_positional_embedding")
    torch.manual_seed(2)
    ref = ref_mod.AxialPositionalEmbedding(12, (3, 5), (4, 8))
    ours = AxialPositionalEmbedding(12, (3, 5), (4, 8))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 13, 12)
    assert_close(ours(x).expand(2, -1, -1), ref(x))


def test_axial_errors():
    with pytest.raises(ValueError, match="axial_dims"):
        AxialPositionalEmbedding(8, (2, 2), (4, 5))
    with pytest.raises(ValueError, match="axial_dims"):
        AxialPositionalEmbedding(8, (2, 2), (8,))
    with pytest.raises(ValueError, match="max_seq_len"):
        AxialPositionalEmbedding(8, (2, 2))(torch.zeros(1, 5, 8))


def test_t5_bucketing_hand_computed_causal():
    # num_buckets=8, max_distance=16: distances 0..3 exact; then 4 + floor(log(d/4)/log(4) * 4)
    distance = torch.arange(0, 20)
    got = t5_relative_position_bucket(-distance, causal=True, num_buckets=8, max_distance=16)
    expected = [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7]
    assert got.tolist() == expected
    future = t5_relative_position_bucket(torch.arange(1, 5), causal=True, num_buckets=8)
    assert future.tolist() == [0, 0, 0, 0]


def test_t5_bucketing_hand_computed_bidirectional():
    # 16 buckets: [0, 8) for keys at or before the query, [8, 16) for keys after it
    rel = torch.tensor([-12, -8, -5, -4, -3, -1, 0, 1, 3, 4, 6, 8, 12, 100])
    got = t5_relative_position_bucket(rel, causal=False, num_buckets=16, max_distance=16)
    assert got.tolist() == [7, 6, 4, 4, 3, 1, 0, 9, 11, 12, 13, 14, 15, 15]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_t5_bias_shape_offset_and_values(causal):
    torch.manual_seed(3)
    bias_mod = T5RelativePositionBias(heads=3, num_buckets=8, max_distance=16, causal=causal)
    bias = bias_mod(5, 9)
    assert bias.shape == (3, 5, 9)
    ids = bias_mod.buckets(5, 9)
    # default offset: query i sits at key position 4 + i, so the diagonal j = i + 4 is distance 0
    assert all(ids[i, i + 4].item() == 0 for i in range(5))
    table = bias_mod.relative_attention_bias.weight
    assert_close(bias[:, 2, 1], table[ids[2, 1]])
    # distance 4: exact bucket when causal; in the bidirectional half of 4 buckets, 2 + 0
    assert ids[0, 0].item() == (4 if causal else 2)
    # explicit offset 0 (queries aligned with the first keys) as in the memorizing reference
    ids0 = bias_mod.buckets(5, 9, offset=0)
    assert ids0[3, 3].item() == 0
    square = bias_mod(6)
    assert square.shape == (3, 6, 6)
    assert torch.equal(bias_mod.buckets(6), bias_mod.buckets(6, 6, offset=0))


def test_t5_bias_scale_and_grad_and_errors():
    bias_mod = T5RelativePositionBias(heads=2, num_buckets=8, max_distance=16, scale=2.0)
    out = bias_mod(4, 4)
    ids = bias_mod.buckets(4, 4)
    assert_close(out, 2.0 * bias_mod.relative_attention_bias.weight[ids].permute(2, 0, 1))
    out.sum().backward()
    assert bias_mod.relative_attention_bias.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativePositionBias(num_buckets=2, causal=False)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativePositionBias(num_buckets=32, max_distance=8)


@pytest.mark.parametrize(
    "axial_shape, axial_dims",
    [((2.5, 3), None), ((2, 3), (8, 0)), ((2, 3), (9, -1))],
    ids=["float-size-truncated", "zero-width", "negative-width"],
)
def test_axial_sizes_and_widths_must_be_positive_ints(axial_shape, axial_dims):
    """A float size was truncated (2.5 -> 2: five positions fewer than asked, silently)."""
    with pytest.raises(ValueError, match="axial"):
        AxialPositionalEmbedding(8, axial_shape, axial_dims)
