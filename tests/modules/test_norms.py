import pytest
import torch
from torch import nn

from longrange.modules.norms import (
    LayerNorm,
    PreLayerNorm,
    PreNorm,
    PreScaleNorm,
    ReZero,
    RMSNorm,
    ScaleNorm,
)
from longrange.testing import assert_close


def test_layernorm_with_and_without_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    with_bias, without = LayerNorm(8), LayerNorm(8, bias=False)
    assert with_bias.bias is not None and without.bias is None
    assert [n for n, _ in without.named_parameters()] == ["weight"]
    expected = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert_close(without(x), expected)
    with torch.no_grad():
        with_bias.bias.fill_(0.5)
    assert_close(with_bias(x), expected + 0.5)


def test_scalenorm_unit_norm_times_g():
    torch.manual_seed(1)
    norm = ScaleNorm(6)
    with torch.no_grad():
        norm.g.fill_(3.0)
    out = norm(torch.randn(4, 6, dtype=torch.float64))
    assert_close(out.norm(dim=-1), torch.full((4,), 3.0, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert norm(torch.zeros(2, 6)).abs().max() == 0


def test_rmsnorm_learned_scale_and_half_precision():
    torch.manual_seed(2)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * torch.arange(1.0, 9.0)
    assert_close(norm(x), expected)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, rtol=2e-2)


@pytest.mark.parametrize("init", [0.0, 1e-3], ids=["zero", "1e-3"])
def test_rezero_initialisation_and_aux_passthrough(init):
    rz = ReZero(lambda x, **kw: (x * 2, torch.tensor(7.0)), init=init)
    x = torch.ones(2, 3)
    out, aux = rz(x)
    assert_close(out, torch.full_like(x, 2 * init) if init else torch.zeros_like(x), rtol=0)
    assert aux.item() == 7.0
    with pytest.raises(TypeError, match="init"):
        ReZero(nn.Identity(), init="zero")


def test_rezero_learns_away_from_zero():
    rz = ReZero(nn.Linear(4, 4))
    rz(torch.randn(2, 4)).sum().backward()
    assert rz.g.grad is not None and rz.g.grad.abs().item() > 0


@pytest.mark.parametrize(
    "norm,cls",
    [
        ("layer", nn.LayerNorm),
        ("layer_no_bias", nn.LayerNorm),
        ("scale", ScaleNorm),
        ("rms", RMSNorm),
    ],
    ids=["layer", "layer_no_bias", "scale", "rms"],
)
def test_prenorm_names_and_kwargs(norm, cls):
    seen = {}

    def fn(x, *, mask=None, context=None):
        seen.update(mask=mask, context=context)
        return x

    pre = PreNorm(8, fn, norm=norm)
    assert isinstance(pre.norm, cls)
    x = torch.randn(2, 3, 8)
    assert_close(pre(x, mask="m", context="c"), pre.norm(x))
    assert seen == {"mask": "m", "context": "c"}


def test_prenorm_callable_and_errors():
    assert isinstance(PreNorm(4, nn.Identity(), norm=nn.LayerNorm).norm, nn.LayerNorm)
    with pytest.raises(ValueError, match="norm"):
        PreNorm(4, nn.Identity(), norm="batch")
    with pytest.raises(TypeError, match="norm"):
        PreNorm(4, nn.Identity(), norm=lambda d: "not a module")
    with pytest.raises(ValueError, match="dim"):
        LayerNorm(0)


def test_prescalenorm_and_prelayernorm():
    x = torch.randn(2, 5, 6)
    pre_scale = PreScaleNorm(6, lambda t, **kw: t, eps=1e-3)
    assert pre_scale.norm.eps == 1e-3
    assert_close(pre_scale(x).norm(dim=-1), torch.ones(2, 5))
    pre_layer = PreLayerNorm(6, lambda t, *, mask: t * mask, bias=False)
    assert pre_layer.norm.bias is None
    assert_close(pre_layer(x, mask=0.0), torch.zeros_like(x), rtol=0)
