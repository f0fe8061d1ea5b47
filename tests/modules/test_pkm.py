import itertools

import pytest
import torch
from torch import nn

from longrange.modules.feedforward import FeedForward
from longrange.modules.pkm import PKM, pkm_value_parameters
from longrange.modules.reversible import ReversibleSequence
from longrange.testing import assert_close


def brute_force_read(pkm: PKM, x: torch.Tensor) -> torch.Tensor:
    """Score all num_keys ** 2 memories per head, keep the top-k, read: the definition."""
    b, n, _ = x.shape
    q = pkm.norm(pkm.to_queries(x).view(b, n, 2, pkm.heads, pkm.dim_head))
    out = torch.zeros(b, n, pkm.values.weight.shape[1], dtype=x.dtype)
    for head in range(pkm.heads):
        s1 = q[:, :, 0, head] @ pkm.keys[head, :, 0].T  # [B, N, K]
        s2 = q[:, :, 1, head] @ pkm.keys[head, :, 1].T
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # [B, N, K * K]
        best, ids = full.topk(pkm.topk, dim=-1)
        out += (best.softmax(-1)[..., None] * pkm.values.weight[ids]).sum(-2)
    return out


@pytest.mark.parametrize("heads,num_keys,topk", [(1, 6, 3), (3, 8, 4)], ids=str)
def test_product_search_equals_brute_force(heads, num_keys, topk):
    torch.manual_seed(0)
    pkm = PKM(12, heads=heads, num_keys=num_keys, topk=topk, dim_head=5).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    assert_close(pkm(x), brute_force_read(pkm, x), rtol=1e-10)


def test_only_selected_values_get_gradients():
    torch.manual_seed(1)
    pkm = PKM(8, heads=2, num_keys=16, topk=2, dim_head=4)
    pkm(torch.randn(1, 3, 8)).sum().backward()
    touched = pkm.values.weight.grad.abs().sum(-1).gt(0).sum().item()
    assert 0 < touched <= 1 * 3 * 2 * 2


def test_layer_query_norm_is_causal_in_training():
    torch.manual_seed(2)
    pkm = PKM(8, heads=2, num_keys=8, topk=3, dim_head=4).train()
    x = torch.randn(2, 9, 8)
    base = pkm(x)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 8)
    assert torch.equal(pkm(changed)[:, :5], base[:, :5])


def test_batch_query_norm_masks_padding_and_skips_update_in_recomputation():
    torch.manual_seed(3)
    pkm = PKM(8, heads=2, num_keys=8, topk=3, dim_head=4, query_norm="batch").train()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = pkm(x, input_mask=mask)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 50)
    assert_close(pkm(noisy, input_mask=mask)[mask], out[mask], rtol=1e-6)
    assert pkm.norm.num_batches_tracked.item() == 2

    block = ReversibleSequence([(nn.Linear(8, 8), pkm)], args_route={"input_mask": (False, True)})
    before = pkm.norm.running_mean.clone()
    y, _ = block(x.requires_grad_(), input_mask=mask)
    after_forward = pkm.norm.running_mean.clone()
    y.sum().backward()
    assert not torch.equal(before, after_forward)
    assert torch.equal(pkm.norm.running_mean, after_forward)
    assert pkm.norm.num_batches_tracked.item() == 3
    pkm.eval()
    assert pkm(x).shape == (2, 6, 8)


def test_value_parameters_helper():
    model = nn.Sequential(PKM(8, num_keys=4, topk=2, dim_head=4), nn.Linear(8, 8))
    model.append(PKM(8, num_keys=4, topk=2, dim_head=4))
    values = pkm_value_parameters(model)
    assert [v.shape for v in values] == [(16, 8), (16, 8)]
    assert values[0] is model[0].values.weight
    assert len(pkm_value_parameters(nn.Linear(2, 2))) == 0


def test_errors():
    with pytest.raises(ValueError, match="topk"):
        PKM(8, num_keys=4, topk=5)
    with pytest.raises(ValueError, match="query_norm"):
        PKM(8, query_norm="rms")


@pytest.fixture
def one_thread():
    # tiny matrices: a second thread only adds synchronisation (slow on a loaded 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pkm_learns_a_toy_regression(one_thread):
    torch.manual_seed(4)
    dim = 16
    pkm = PKM(dim, heads=2, num_keys=16, topk=8, dim_head=16)
    teacher = FeedForward(dim, mult=2).requires_grad_(False)
    values = pkm_value_parameters(pkm)
    rest = [p for p in pkm.parameters() if all(p is not v for v in values)]
    opt = torch.optim.Adam([{"params": rest}, {"params": values, "lr": 5e-2}], lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        x = torch.randn(8, 32, dim, generator=gen)
        loss = (pkm(x) - teacher(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"\nPKM toy regression loss {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(list(itertools.chain(rest, values))) == len(list(pkm.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("query_norm", ["layer", "batch"])
def test_half_precision_runs(dtype, query_norm):
    pkm = PKM(16, num_keys=8, topk=4, dim_head=8, query_norm=query_norm).to(dtype)
    out = pkm(torch.randn(2, 33, 16).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(pkm.values.weight.grad).all()


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)], ids=["batch0", "len0"])
def test_no_positions_give_an_empty_output(shape):
    out = PKM(8, heads=2, num_keys=4, topk=2, dim_head=4)(torch.randn(*shape))
    assert out.shape == shape


def test_wrong_input_or_mask_is_named():
    pkm = PKM(8, heads=2, num_keys=4, topk=2, dim_head=4, query_norm="batch")
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="x must be"):
        pkm(x[0])
    with pytest.raises(ValueError, match="x must be"):
        pkm(torch.randn(2, 5, 6))
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="input_mask"):
        pkm(x, input_mask=mask.float())
    with pytest.raises(ValueError, match="input_mask"):
        pkm(x, input_mask=mask[:, :3])
