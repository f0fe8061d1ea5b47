import pytest
import torch

from longrange.testing import assert_compiled_step_equals_eager


def _linear_loss(scale_when_compiled: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)

    def loss(x):
        scale = scale_when_compiled if torch.compiler.is_compiling() else 1.0
        return (model(x) * scale).square().sum()

    return model, loss


@pytest.mark.slow
def test_compiled_step_check_passes_when_compile_changes_nothing():
    model, loss = _linear_loss(1.0)
    assert_compiled_step_equals_eager(model, loss, torch.randn(5, 4))


@pytest.mark.slow
def test_compiled_step_check_names_what_differs():
    model, loss = _linear_loss(2.0)
    with pytest.raises(AssertionError, match="loss: relative error"):
        assert_compiled_step_equals_eager(model, loss, torch.randn(5, 4))
