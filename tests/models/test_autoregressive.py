import pytest
import torch
from torch import nn

from longrange.convert import copy_weights, load_reference, register_converter
from longrange.generation import RecomputeDecoder, decode_loop, top_k
from longrange.models.autoregressive import AutoregressiveWrapper
from longrange.models.registry import create_model
from longrange.modules.autopad import Autopadder, pad_to_multiple


class _Echo(nn.Module):
    """Logits that put all mass on the current token: next-token prediction = copy."""

    max_seq_len = 32
    aux = 0.0

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x, mask=None):
        return nn.functional.one_hot(x, 256).float() * self.scale, torch.tensor(self.aux)


def test_loss_uses_shifted_targets_and_adds_aux():
    net = _Echo()
    wrapper = AutoregressiveWrapper(net)
    x = torch.full((2, 9), 7)
    expected = torch.log1p(255 * torch.exp(torch.tensor(-10.0)))
    assert wrapper(x).item() == pytest.approx(expected.item(), rel=1e-3)
    net.aux = 0.25
    assert wrapper(x).item() == pytest.approx(expected.item() + 0.25, rel=1e-3)
    assert wrapper(torch.arange(10)[None]).item() > 5


def test_generate_with_incremental_state_matches_recompute():
    model = create_model("vanilla", "tiny").eval()
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(0, 256, (2, 6))
    torch.manual_seed(3)
    fast = wrapper.generate(prompt, 12, filter_thres=0.99)
    torch.manual_seed(3)

    def pick(logits, history):
        probs = torch.softmax(top_k(logits.float(), 0.99), dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)

    slow = decode_loop(RecomputeDecoder(model, model.config.max_seq_len), prompt, 12, pick)
    assert torch.equal(fast, slow)


def test_generate_pads_after_eos():
    wrapper = AutoregressiveWrapper(_Echo(), pad_value=0)
    # the echo net repeats the last token: row 0 emits eos at once, row 1 never does
    out = wrapper.generate(torch.tensor([[5, 9], [5, 4]]), 4, eos_token=9, filter_thres=0.99)
    assert out.tolist() == [[9, 0, 0, 0], [4, 4, 4, 4]]
    # every row finished: sampling stops early, as in the references
    assert wrapper.generate(torch.tensor([[5, 9]]), 4, eos_token=9, filter_thres=0.99).tolist() == [[9]]


def test_recompute_generation_grows_mask_on_the_right():
    seen = []

    class Spy(_Echo):
        def forward(self, x, mask=None):
            seen.append(mask.clone())
            return super().forward(x)

    wrapper = AutoregressiveWrapper(Spy())
    mask = torch.tensor([[False, True, True]])
    wrapper.generate(torch.tensor([[0, 4, 4]]), 2, mask=mask, filter_thres=0.99)
    assert seen[1].tolist() == [[False, True, True, True]]


def test_autopadder_pads_and_unpads():
    calls = {}

    class Net(nn.Module):
        pad_multiple = 8

        def forward(self, x, mask=None):
            calls["shape"], calls["mask"] = x.shape, mask
            return x.float()[..., None]

    out = Autopadder(Net())(torch.ones(2, 13, dtype=torch.long))
    assert calls["shape"] == (2, 16)
    assert calls["mask"][:, 13:].any().item() is False and calls["mask"][:, :13].all()
    assert out.shape == (2, 13, 1)
    with pytest.raises(ValueError, match="pad_multiple"):
        Autopadder(nn.Identity())
    padded, pad = pad_to_multiple(torch.ones(1, 5, 3), 4, dim=1)
    assert padded.shape == (1, 8, 3) and pad == 3


def test_convert_registry():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

    register_converter(
        A, lambda model, sd: copy_weights(model, sd, {"w.weight": "lin.weight", "w.bias": "lin.bias"})
    )
    src = nn.Module()
    src.lin = nn.Linear(2, 2)
    model = load_reference(A(), src.state_dict())
    assert torch.equal(model.w.weight, src.lin.weight)
    with pytest.raises(ValueError, match="no weight"):
        load_reference(A(), {"lin.weight": src.lin.weight})
    with pytest.raises(ValueError, match="no reference converter"):
        load_reference(nn.Linear(1, 1), {})
