"""modules/branch: pre-norm / ReZero gates under each family's names, the mask-aware token
shift continuing from a decoding cache, recomputation, auxiliary losses."""

import pytest
import torch
from torch import nn

from longrange.modules.branch import Branch
from longrange.modules.norms import ScaleNorm
from longrange.modules.shift import shift_tokens
from longrange.testing import assert_close


class _Record(nn.Module):
    """fn(x, **kwargs) = linear(x); remembers the keywords and counts its calls."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.calls = 0
        self.seen: dict = {}

    def forward(self, x, **kwargs):
        self.calls += 1
        self.seen = kwargs
        return self.linear(x)


def x_of(n=7, seed=0):
    return torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "gate,init,shape", [("g", 1e-3, ()), ("g", 0.0, (1,)), ("residual_weight", 0.0, (1,))]
)
def test_rezero_gate_keeps_the_family_name_shape_and_start(gate, init, shape):
    torch.manual_seed(0)
    branch = Branch(8, _Record(), norm="rezero", gate=gate, gate_init=init, gate_shape=shape)
    assert sorted(branch.state_dict()) == sorted([gate, "fn.linear.weight", "fn.linear.bias"])
    assert branch.state_dict()[gate].shape == shape and branch.norm is None
    x = x_of()
    with torch.no_grad():
        getattr(branch, gate).fill_(0.5)
        assert_close(branch(x), 0.5 * branch.fn.linear(x), 1e-6)


@pytest.mark.parametrize("norm,kind", [("layer", nn.LayerNorm), ("scale", ScaleNorm)])
def test_pre_norm_feeds_the_normalised_input(norm, kind):
    torch.manual_seed(0)
    branch = Branch(8, _Record(), norm=norm)
    assert isinstance(branch.norm, kind) and "g" not in dict(branch.named_parameters())
    x = x_of()
    assert_close(branch(x), branch.fn.linear(branch.norm(x)), 1e-6)


@pytest.mark.parametrize("mask_key", ["mask", "input_mask"])
def test_token_shift_honours_the_mask_under_its_keyword(mask_key):
    torch.manual_seed(0)
    fn = _Record()
    branch = Branch(8, fn, norm="layer", shifts=(0, 1), mask_key=mask_key)
    x, mask = x_of(), torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2] = False
    out = branch(x, **{mask_key: mask})
    assert fn.seen[mask_key] is mask  # the mask goes on to fn
    want = fn.linear(shift_tokens(branch.norm(x), (0, 1), mask))
    assert_close(out, want, 1e-6)


def test_shift_continues_from_the_cache():
    torch.manual_seed(0)
    branch = Branch(8, _Record(), norm="scale", shifts=(0, 1, 2))
    x = x_of(9)
    whole = branch(x)
    cache: dict = {}
    pieces = [branch(x[:, :4], cache=cache), branch(x[:, 4:5], cache=cache), branch(x[:, 5:], cache=cache)]
    assert cache["shift"].shape == (2, 2, 8)  # the most a shift reaches back
    assert branch.fn.seen["cache"] is cache  # fn keeps its own entries in the same dict
    assert_close(torch.cat(pieces, dim=1), whole, 1e-6)


def test_recompute_reruns_the_branch_in_backward_with_the_same_gradients():
    def grads(recompute):
        torch.manual_seed(0)
        branch = Branch(8, _Record(), norm="layer", recompute=recompute).train()
        x = x_of().requires_grad_()
        branch(x).square().sum().backward()
        return branch.fn.calls, [x.grad, *(p.grad for p in branch.parameters())]

    calls, plain = grads(False)
    calls_again, rerun = grads(True)
    assert (calls, calls_again) == (1, 2)
    for got, want in zip(rerun, plain):
        assert_close(got, want, 1e-6)


def test_auxiliary_loss_passes_ungated_and_bad_norm_is_refused():
    class WithAux(nn.Module):
        def forward(self, x):
            return x * 3, torch.tensor(0.25)

    branch = Branch(8, WithAux(), norm="rezero", gate_init=0.5)
    x = x_of()
    out, aux = branch(x)
    assert_close(out, 1.5 * x, 1e-6)
    assert aux.item() == 0.25
    with pytest.raises(ValueError, match="norm must be one of"):
        Branch(8, WithAux(), norm="rms")
