import pytest
import torch
from torch import nn

from longrange.modules.project import ProjectInOut
from longrange.testing import assert_close


def test_project_in_and_out():
    torch.manual_seed(0)
    inner = nn.Linear(16, 16)
    layer = ProjectInOut(inner, 8, 16)
    x = torch.randn(2, 5, 8)
    expected = layer.project_out(inner(layer.project_in(x)))
    assert_close(layer(x), expected)
    assert layer(x).shape == (2, 5, 8)


def test_project_out_false_and_kwargs_and_aux():
    def fn(x, *, scale):
        return x * scale, torch.tensor(3.0)

    layer = ProjectInOut(fn, 8, 4, project_out=False)
    x = torch.randn(1, 3, 8)
    out, aux = layer(x, scale=2.0)
    assert out.shape == (1, 3, 4) and aux.item() == 3.0
    assert_close(out, layer.project_in(x) * 2)
    with pytest.raises(ValueError, match="dim_in"):
        ProjectInOut(fn, 0, 4)
