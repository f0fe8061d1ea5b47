import re

import pytest
import torch

from longrange.generation import apply_repetition_penalty, filter_top_k, filter_top_p, generate, sample_next
from longrange.models.registry import create_model


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = filter_top_k(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_p(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_top_p(probs.log(), 0.01).isfinite().sum() == 1


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0]]


def test_eos_stops_and_pads():
    model = create_model("vanilla", "tiny").eval()
    prompt = torch.randint(0, 256, (1, 4))
    first = model.generate(prompt, 1, temperature=0)
    out = generate(model, prompt, 10, temperature=0, eos_token=int(first[0, 0]))
    assert out.shape == (1, 10)
    assert (out == first[0, 0]).all()


def test_sampling_is_reproducible_with_a_generator():
    model = create_model("vanilla", "tiny").eval()
    prompt = torch.randint(0, 256, (3,))
    a = model.generate(prompt, 12, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 12, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a.shape == (12,) and torch.equal(a, b)


def test_generation_past_the_context_window():
    model = create_model("vanilla", "tiny", max_seq_len=16).eval()
    out = model.generate(torch.randint(0, 256, (1, 10)), 40, temperature=0)
    assert out.shape == (1, 40)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
    ids=["temperature", "top_k", "top_p", "penalty"],
)
def test_bad_sampling_arguments(kwargs, message):
    model = create_model("vanilla", "tiny")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


def test_a_tiny_temperature_samples_the_most_likely_token():
    """A temperature so small that the largest logit divided by it overflows to inf used to
    give NaN probabilities and torch.multinomial's RuntimeError."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-4.0, -5.0, -6.0]])
    for temperature in (1e-40, 1e-300):
        assert sample_next(logits, temperature=temperature).tolist() == [1, 0]
        assert sample_next(logits, temperature=temperature, top_k=2, top_p=0.5).tolist() == [1, 0]
    model = create_model("vanilla", "tiny").eval()
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, 6, temperature=1e-40), model.generate(prompt, 6, temperature=0))


@pytest.mark.parametrize(
    "prompt, kwargs, error, message",
    [
        ([1, 2, 3], {}, TypeError, "prompt must be a tensor of token ids, [N] or [B, N], got list"),
        (torch.tensor(5), {}, ValueError, "prompt must have shape [N] or [B, N], got ()"),
        (torch.zeros(1, 2, 3, dtype=torch.long), {}, ValueError, "prompt must have shape [N] or [B, N]"),
        (
            torch.zeros(1, 2, dtype=torch.long),
            {"generator": 7},
            TypeError,
            "generator must be a torch.Generator",
        ),
    ],
    ids=["list", "scalar", "three-dims", "generator"],
)
def test_bad_prompts_and_generators_are_refused_naming_them(prompt, kwargs, error, message):
    """A list or a 0-d prompt failed with AttributeError / IndexError, a generator that is
    not one inside torch.multinomial after the prompt had run."""
    model = create_model("vanilla", "tiny")
    with pytest.raises(error, match=re.escape(message)):
        model.generate(prompt, 3, **kwargs)
