import pytest
import torch

from longrange.modules.shift import PreShiftTokens, shift_tokens
from longrange.testing import assert_close


def test_shift_moves_slices_and_keeps_remainder():
    x = torch.arange(1, 1 + 2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    out = shift_tokens(x, (0, 1, -1))  # slices of 2 features; feature 6 is the remainder
    assert torch.equal(out[..., 0:2], x[..., 0:2])
    assert torch.equal(out[:, 1:, 2:4], x[:, :-1, 2:4]) and out[:, 0, 2:4].eq(0).all()
    assert torch.equal(out[:, :-1, 4:6], x[:, 1:, 4:6]) and out[:, -1, 4:6].eq(0).all()
    assert torch.equal(out[..., 6], x[..., 6])


def test_shift_larger_than_sequence_gives_zeros():
    x = torch.randn(1, 3, 4)
    assert shift_tokens(x, (5, -4))[..., :4].eq(0).all()


@pytest.mark.parametrize("shifts", [(0, 1), (1, 2, 0), (0, 3)], ids=str)
def test_shift_is_causal_for_non_negative_shifts(shifts):
    torch.manual_seed(0)
    x = torch.randn(2, 11, 12)
    base = shift_tokens(x, shifts)
    for t in (0, 4, 9):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        assert torch.equal(shift_tokens(changed, shifts)[:, : t + 1], base[:, : t + 1])


def test_padding_is_never_shifted_into_real_tokens():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 6:] = False  # right padding
    mask[1, 2] = False  # a hole
    out = shift_tokens(x, (0, 1, 2), mask)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    out_noisy = shift_tokens(noisy, (0, 1, 2), mask)
    assert torch.equal(out[mask], out_noisy[mask])
    # the first real token of row 0 receives zeros from the padding before it
    assert out[0, 3, 2:6].eq(0).all()
    assert out[1, 3, 2:4].eq(0).all()  # one step back is the hole
    assert torch.equal(out[1, 3, 4:6], x[1, 1, 4:6])  # two steps back is real


def test_shift_with_past_equals_whole_sequence():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 9)
    mask = torch.rand(2, 10) > 0.3
    whole = shift_tokens(x, (0, 1, 3), mask)
    head = shift_tokens(x[:, :6], (0, 1, 3), mask[:, :6])
    tail = shift_tokens(x[:, 6:], (0, 1, 3), mask[:, 6:], past=x[:, 3:6], past_mask=mask[:, 3:6])
    assert_close(torch.cat((head, tail), dim=1), whole, rtol=0)
    step = shift_tokens(x[:, 9:], (0, 1, 3), past=x[:, :9])
    assert_close(step, shift_tokens(x, (0, 1, 3))[:, 9:], rtol=0)


def test_shift_errors():
    x = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="shifts"):
        shift_tokens(x, ())
    with pytest.raises(TypeError, match="shifts"):
        shift_tokens(x, (0, 1.5))
    with pytest.raises(ValueError, match="mask"):
        shift_tokens(x, (0, 1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="past"):
        shift_tokens(x, (0, -1), past=x)
    with pytest.raises(ValueError, match="len\\(shifts\\)"):
        shift_tokens(x, (0, 1, 1, 1, 1))


def test_pre_shift_tokens_reads_the_named_mask_and_passes_it_on():
    seen = {}

    def fn(x, **kwargs):
        seen.update(kwargs)
        return x

    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[False, True, True, True, True]])
    pre = PreShiftTokens((0, 1), fn, mask_key="input_mask")
    out = pre(x, input_mask=mask)
    assert seen["input_mask"] is mask
    assert torch.equal(out, shift_tokens(x, (0, 1), mask))
    assert out[0, 1, 2:].eq(0).all()


def test_past_mask_must_be_bool():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="past_mask"):
        shift_tokens(x, (0, 1), past=x[:, :2], past_mask=torch.ones(2, 2))
