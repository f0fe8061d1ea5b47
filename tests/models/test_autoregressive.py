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


def _draw(logits: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)


def _windowed_rerun(run, prompt, count, limit, keep, seed):
    """Tokens drawn (seeded, like the wrappers' draws) from full re-runs of ``run(tokens) ->
    logits [B, n, V]`` over the tokens since a window start that moves on to the last
    ``keep`` tokens whenever the window would pass ``limit`` (keep = limit: a sliding window;
    keep = limit // 2: a restart)."""
    torch.manual_seed(seed)
    history, start, new = prompt, 0, []
    with torch.no_grad():
        for _ in range(count):
            if history.shape[1] - start > limit:
                start = history.shape[1] - keep
            token = _draw(run(history[:, start:])[:, -1])
            new.append(token)
            history = torch.cat((history, token[:, None]), dim=1)
    return torch.stack(new, dim=1)


def _seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def test_window_slide_reruns_the_last_window_and_the_default_restarts():
    torch.manual_seed(0)
    model = create_model("vanilla", "tiny", max_seq_len=16).eval()
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(0, 256, (2, 10))
    # filter_thres=0 keeps every logit: plain draws from the softmax
    slide = _seeded(5, wrapper.generate, prompt, 20, filter_thres=0.0, window="slide")
    restart = _seeded(5, wrapper.generate, prompt, 20, filter_thres=0.0)
    assert torch.equal(slide, _windowed_rerun(model, prompt, 20, 16, 16, seed=5))
    assert torch.equal(restart, _windowed_rerun(model, prompt, 20, 16, 8, seed=5))
    assert torch.equal(slide[:, :7], restart[:, :7])  # the same until the window fills
    assert not torch.equal(slide, restart)
    with pytest.raises(ValueError, match="window"):
        wrapper.generate(prompt, 2, window="shift")


def test_sample_takes_the_token_choice():
    wrapper = AutoregressiveWrapper(_Echo())
    always_three = lambda logits, history: torch.full(logits.shape[:1], 3)  # noqa: E731
    assert wrapper.sample(torch.tensor([[5, 9]]), 3, always_three).tolist() == [[3, 3, 3]]
    for bad in (dict(seq_len=-1), dict(temperature=0.0), dict(filter_thres=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            wrapper.generate(torch.tensor([[5]]), **{"seq_len": 2, **bad})


def test_a_tiny_temperature_samples_the_most_likely_token():
    """Dividing the logits by 1e-40 overflowed the largest to inf: NaN probabilities and
    torch.multinomial's RuntimeError."""
    wrapper = AutoregressiveWrapper(_Echo())
    for temperature in (1e-40, 1e-300):
        out = wrapper.generate(torch.tensor([[5, 9]]), 3, temperature=temperature, filter_thres=0.0)
        assert out.tolist() == [[9, 9, 9]]
    model = create_model("vanilla", "tiny").eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = decode_loop(model, prompt, 4, lambda logits, history: logits.argmax(dim=-1))
    assert torch.equal(AutoregressiveWrapper(model).generate(prompt, 4, temperature=1e-40), greedy)


@pytest.mark.parametrize(
    "prompt, error",
    [
        ([5, 9], TypeError),
        ((5, 9), TypeError),
        (torch.tensor(5), ValueError),
        (torch.zeros(1, 1, 2, dtype=torch.long), ValueError),
    ],
    ids=["list", "tuple", "scalar", "3-d"],
)
def test_sample_refuses_a_prompt_that_is_not_a_token_tensor(prompt, error):
    wrapper = AutoregressiveWrapper(_Echo())
    with pytest.raises(error, match=r"start_tokens must .*\[N\] or \[B, N\]"):
        wrapper.generate(prompt, 2)


def _lm_wrappers():
    from longrange.models import performer, routing, sinkhorn

    torch.manual_seed(0)
    small = dict(num_tokens=32, dim=32, depth=1, max_seq_len=16)
    yield (
        "routing",
        routing.AutoregressiveWrapper(
            routing.RoutingTransformerLM(**small, heads=2, dim_head=16, window_size=8, causal=True)
        ),
    )
    yield (
        "sinkhorn",
        sinkhorn.AutoregressiveWrapper(
            sinkhorn.SinkhornTransformerLM(**small, heads=2, bucket_size=4, causal=True)
        ),
    )
    yield (
        "performer",
        performer.AutoregressiveWrapper(
            performer.PerformerLM(**small, heads=2, dim_head=16, causal=True, nb_features=16)
        ),
    )


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["routing", "sinkhorn", "performer"])
def test_every_reference_wrapper_takes_window(family):
    wrapper = dict(_lm_wrappers())[family].eval()
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    run = lambda t: _first(wrapper.net(t))  # noqa: E731
    slide = _seeded(3, wrapper.generate, prompt, 20, filter_thres=0.0, window="slide")
    assert torch.equal(slide, _windowed_rerun(run, prompt, 20, 16, 16, seed=3))
    restart = _seeded(3, wrapper.generate, prompt, 20, filter_thres=0.0)
    assert torch.equal(restart, _windowed_rerun(run, prompt, 20, 16, 8, seed=3))
    assert not torch.equal(slide, restart)


def _enc_decs():
    from longrange.models import performer, routing, sinkhorn

    torch.manual_seed(0)
    sides = dict(num_tokens=32, depth=1, max_seq_len=16)
    both = {f"{p}{k}": v for p in ("enc_", "dec_") for k, v in sides.items()}
    yield (
        "routing",
        routing.RoutingTransformerEncDec(
            dim=32, **both, enc_heads=2, dec_heads=2, enc_window_size=8, dec_window_size=8
        ),
    )
    yield (
        "sinkhorn",
        sinkhorn.SinkhornTransformerEncDec(
            dim=32, **both, enc_heads=2, dec_heads=2, enc_bucket_size=4, dec_bucket_size=4
        ),
    )
    yield "performer", performer.PerformerEncDec(dim=32, **both, heads=2, nb_features=16)


@pytest.mark.parametrize("family", ["routing", "sinkhorn", "performer"])
def test_every_encoder_decoder_takes_window(family):
    model = dict(_enc_decs())[family].eval()
    src = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(2))
    start = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        context = _first(model.run_encoder(src, {}))
    run = lambda t: _first(model.dec.net(t, context=context))  # noqa: E731
    run(start)
    slide = _seeded(4, model.generate, src, start, 24, filter_thres=0.0, window="slide")
    assert torch.equal(slide, _windowed_rerun(run, start, 24, 16, 16, seed=4))
    restart = _seeded(4, model.generate, src, start, 24, filter_thres=0.0)
    assert torch.equal(restart, _windowed_rerun(run, start, 24, 16, 8, seed=4))
    assert not torch.equal(slide, restart)
