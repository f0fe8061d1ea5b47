import pytest
import torch

from longrange.modules.rotary import RotaryEmbedding
from longrange.testing import assert_close


def dots_at(rotary, q, k, q_pos, k_pos):
    """q·k after rotating q at q_pos and k at k_pos (single vectors [D])."""
    rq, rk = rotary.rotate_queries_and_keys(
        q[None], k[None], torch.tensor([float(q_pos)]), torch.tensor([float(k_pos)])
    )
    return (rq * rk).sum()


@pytest.mark.parametrize(
    "interleaved,xpos", [(False, None), (True, None), (False, 64.0)], ids=["half", "pairs", "xpos"]
)
def test_dot_product_depends_only_on_position_difference(interleaved, xpos):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, interleaved=interleaved, xpos_scale_base=xpos).double()
    q, k = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    base = dots_at(rotary, q, k, 7, 3)
    for shift in (1, 5, 40, 1000):
        assert_close(dots_at(rotary, q, k, 7 + shift, 3 + shift), base, rtol=1e-9)
    assert abs(dots_at(rotary, q, k, 8, 3) - base) > 1e-6


def test_interleaved_is_a_permutation_of_rotate_half():
    torch.manual_seed(1)
    rot, dim = 6, 10
    half = RotaryEmbedding(rot, interleaved=False)
    pairs = RotaryEmbedding(rot, interleaved=True)
    x = torch.randn(2, 5, dim)
    pos = torch.arange(5.0) + 3
    # interleaved feature 2i pairs with 2i + 1; in the half layout i pairs with i + rot / 2
    to_half = torch.cat((torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, dim)))
    back = torch.argsort(to_half)
    expected = half.rotate(x[..., to_half], pos)[..., back]
    assert_close(pairs.rotate(x, pos), expected, rtol=1e-6)


def test_rotation_keeps_norm_and_leaves_the_tail():
    torch.manual_seed(2)
    rotary = RotaryEmbedding(4)
    x = torch.randn(3, 9, 10)
    out = rotary.rotate(x, torch.arange(9.0))
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert_close(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), rtol=1e-6)
    assert torch.equal(rotary.rotate(x, torch.zeros(9)), x)


def test_xpos_scales_queries_up_and_keys_down():
    rotary = RotaryEmbedding(8, xpos_scale_base=32.0)
    pos = torch.arange(6.0)
    scale = rotary.xpos_scale(pos)
    assert torch.equal(scale[0], torch.ones(8))
    assert (scale[1:] < 1).all()  # zeta < 1, so scales shrink with position
    with pytest.raises(ValueError, match="xpos"):
        RotaryEmbedding(8).xpos_scale(pos)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
