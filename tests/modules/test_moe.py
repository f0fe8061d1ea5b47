import pytest
import torch
from torch import nn

from longrange.modules.moe import MoE
from longrange.modules.reversible import ReversibleSequence
from longrange.testing import assert_close


def reference_pair(**kwargs):
    ref_pkg = pytest.importorskip("mixture_of_experts")
    torch.manual_seed(0)
    ref = ref_pkg.MoE(**kwargs)
    ours = MoE(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


CASES = {
    "all": dict(second_policy_train="all"),
    "none": dict(second_policy_train="none"),
    "tight_capacity": dict(second_policy_train="all", capacity_factor_train=0.5),
    "random": dict(second_policy_train="random"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_mixture_of_experts_package(case):
    ref, ours = reference_pair(dim=8, num_experts=4, hidden_dim=16, **CASES[case])
    x = torch.randn(3, 37, 8)
    torch.manual_seed(1)
    expected, expected_loss = ref(x)
    torch.manual_seed(1)
    out, loss = ours(x)
    assert_close(out, expected, rtol=1e-5)
    assert_close(loss, expected_loss, rtol=1e-5)


def test_eval_uses_eval_settings():
    ref, ours = reference_pair(dim=8, num_experts=4, second_policy_eval="none", capacity_factor_eval=0.7)
    ref.eval(), ours.eval()
    x = torch.randn(2, 40, 8)
    assert ours.gate.capacity(40) == max(4, int(40 * 0.7 / 4))
    assert_close(ours(x)[0], ref(x)[0], rtol=1e-5)
    ours.train()
    assert ours.gate.capacity(40) == int(40 * 1.25 / 4)


def test_threshold_policy_between_all_and_none():
    # the package's threshold policy fails on a shape error, so it is checked by its limits
    torch.manual_seed(6)
    x = torch.randn(2, 24, 8)
    settings = {
        "low": ("threshold", 0.0),
        "all": ("all", 0.2),
        "high": ("threshold", 0.5),
        "none": ("none", 0.2),
        "mid": ("threshold", 0.3),
    }
    outs = {}
    for name, (policy, threshold) in settings.items():
        torch.manual_seed(7)
        moe = MoE(8, 4, second_policy_train=policy, second_threshold_train=threshold)
        outs[name] = moe(x)[0]
    assert torch.equal(outs["low"], outs["all"]) and torch.equal(outs["high"], outs["none"])
    assert not torch.equal(outs["mid"], outs["all"])
    assert not torch.equal(outs["mid"], outs["none"])


def test_causal_slots_do_not_depend_on_later_tokens():
    torch.manual_seed(2)
    kw = dict(second_policy_train="all", capacity_factor_train=1.0)
    causal, plain = MoE(8, 4, **kw, causal=True), MoE(8, 4, **kw)
    plain.load_state_dict(causal.state_dict())
    leaks = 0
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 48, 8, generator=gen)
        changed = x.clone()
        changed[:, 24:] = torch.randn(2, 24, 8, generator=gen)
        assert torch.equal(causal(changed)[0][:, :24], causal(x)[0][:, :24])
        leaks += not torch.equal(plain(changed)[0][:, :24], plain(x)[0][:, :24])
    # the package's slot order lets later first choices push out earlier second choices
    assert leaks > 0


@pytest.mark.parametrize("causal", [False, True], ids=["grouped", "causal"])
def test_padding_takes_no_capacity_and_no_part_in_the_loss(causal):
    torch.manual_seed(3)
    moe = MoE(8, 4, second_policy_train="all", capacity_factor_train=1.0, causal=causal)
    x = torch.randn(2, 30, 8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :10] = False
    mask[1, 20:] = False
    out, loss = moe(x, mask)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 10)
    out2, loss2 = moe(noisy, mask)
    assert torch.equal(out[mask], out2[mask]) and out2[~mask].eq(0).all()
    assert_close(loss, loss2, rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        moe(x, mask.float())


def test_aux_loss_gradients_through_reversible_stack_with_random_policy():
    torch.manual_seed(4)

    def blocks():
        return [(nn.Linear(8, 8), MoE(8, 4, hidden_dim=16)) for _ in range(3)]

    rev, plain = ReversibleSequence(blocks()), ReversibleSequence(blocks(), recompute=False)
    plain.load_state_dict(rev.state_dict())
    rev.double(), plain.double()
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    grads = []
    for stack in (rev, plain):
        torch.manual_seed(9)
        out, aux = stack(x.clone().requires_grad_())
        (out.pow(2).mean() + 10 * aux).backward()
        grads.append({n: p.grad.clone() for n, p in stack.named_parameters()})
    for name, g in grads[0].items():
        assert_close(g, grads[1][name], rtol=1e-9, name=name)
    assert grads[0]["blocks.0.g.gate.w_gating"].abs().sum() > 0


def test_errors():
    with pytest.raises(ValueError, match="second_policy_train"):
        MoE(8, second_policy_train="sometimes")
    with pytest.raises(ValueError, match="num_experts"):
        MoE(8, num_experts=1)
    with pytest.raises(ValueError, match="capacity_factor_eval"):
        MoE(8, capacity_factor_eval=0)


@pytest.fixture
def one_thread():
    # tiny matrices: a second thread only adds synchronisation (slow on a loaded 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_moe_learns_a_toy_regression(one_thread):
    torch.manual_seed(5)
    dim = 8
    moe = MoE(dim, num_experts=4, hidden_dim=32, second_policy_train="all")
    teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, dim)).requires_grad_(False)
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        x = torch.randn(8, 32, dim, generator=gen)
        out, aux = moe(x)
        loss = (out - teacher(x)).pow(2).mean()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"\nMoE toy regression loss {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs(dtype):
    moe = MoE(16, 4).to(dtype)
    out, aux = moe(torch.randn(2, 33, 16).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(aux)
    (out.float().sum() + aux).backward()
    assert torch.isfinite(moe.experts.w1.grad).all()
