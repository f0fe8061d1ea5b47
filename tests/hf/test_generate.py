"""transformers' generate on the longrange decoding state: greedy equals longrange's generate
token for token, decoding runs one new token per call, what cannot work is refused."""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")

from transformers import pipeline

import longrange.hf as lh
from longrange.data.tokenizer import ByteTokenizer


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generate_equals_longrange_generate(family, tiny):
    model = tiny(family)
    hf = lh.wrap(model)
    start = prompt(2, 7)
    native = model.generate(start, 40, temperature=0)
    assert len(set(native.flatten().tolist())) > 3  # a continuation worth comparing
    out = hf.generate(start, max_new_tokens=40, do_sample=False)
    assert torch.equal(out[:, :7], start)
    assert torch.equal(out[:, 7:], native)


def test_greedy_generate_past_the_window(family, tiny):
    # The native loop restarts from the last half window when a bounded state is full; HF
    # generate on the cache must do the same (families with no bound just keep going).
    model = tiny(family)
    limit = model.context_limit() or model.config.max_seq_len
    start = prompt(1, limit - 5, seed=3)
    native = model.generate(start, 20, temperature=0)
    out = lh.wrap(model).generate(start, max_new_tokens=20, do_sample=False)
    assert torch.equal(out[:, start.shape[1] :], native)


def test_decoding_feeds_one_token_per_step(family, tiny, monkeypatch):
    model = tiny(family)
    fed = []
    real_prefill = model.prefill

    def prefill(tokens, state=None, **kw):
        fed.append(tokens.shape[1])
        return real_prefill(tokens, state, **kw)

    monkeypatch.setattr(model, "prefill", prefill)
    out = lh.wrap(model).generate(
        prompt(1, 9), max_new_tokens=12, do_sample=False, return_dict_in_generate=True
    )
    assert fed == [9] + [1] * 11  # the prompt once, then only the new token: the state continues
    assert isinstance(out.cache, lh.LongRangeCache) and out.cache.get_seq_length() == 20
    out.cache.close()


def test_cache_by_hand_continues_a_forward(family, tiny):
    # What a user's own decoding loop does: use_cache=True, then past_key_values (or cache).
    model = tiny(family)
    hf = lh.wrap(model)
    n = min(12, model.config.max_seq_len)
    seq = prompt(2, n, seed=4)
    a, b = n // 2, n - 2
    with torch.no_grad():
        whole = hf(input_ids=seq).logits
        first = hf(input_ids=seq[:, :a], use_cache=True)
        cache = first.cache
        second = hf(input_ids=seq[:, a:b], past_key_values=cache)
        third = hf(input_ids=seq[:, b:], cache=second.cache)
    assert second.cache is cache and third.cache is cache and cache.get_seq_length() == n
    got = torch.cat([first.logits, second.logits, third.logits], dim=1)
    assert torch.allclose(got, whole, atol=1e-4)
    cache.close()


def test_sampling_runs_on_the_state(tiny):
    hf = lh.wrap(tiny("vanilla"))
    torch.manual_seed(0)
    a = hf.generate(prompt(2, 5), max_new_tokens=15, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = hf.generate(prompt(2, 5), max_new_tokens=15, do_sample=True, top_k=20)
    assert a.shape == (2, 20) and torch.equal(a, b)


def test_eos_ends_rows_as_longrange_does(tiny):
    model = tiny("vanilla")
    start = prompt(2, 6)
    free = model.generate(start, 30, temperature=0)
    eos = int(free[0, 4])
    native = model.generate(start, 30, temperature=0, eos_token=eos)
    out = lh.wrap(model).generate(
        start, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    new = out[:, 6:]
    assert torch.equal(new, native[:, : new.shape[1]])
    assert (native[:, new.shape[1] :] == eos).all()


def test_generate_refuses_what_the_state_cannot_do(tiny):
    hf = lh.wrap(tiny("vanilla"))
    with pytest.raises(ValueError, match="beam_search"):
        hf.generate(prompt(1, 5), max_new_tokens=4, num_beams=2, do_sample=False)
    padded = prompt(2, 6)
    mask = torch.ones_like(padded)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padded batch"):
        hf.generate(padded, attention_mask=mask, max_new_tokens=4, do_sample=False)
    limit = hf.longrange.context_limit()
    with pytest.raises(ValueError, match="decoding window"):
        hf.generate(prompt(1, limit + 1), max_new_tokens=2, do_sample=False)
    cache = lh.LongRangeCache()
    with pytest.raises(ValueError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))


def test_padded_batch_without_the_cache(family, tiny):
    # use_cache=False re-runs the whole sequence per token and honours the (left) padding mask,
    # for every family (the Performer's, Routing's and Sinkhorn's positions shifted with it before).
    model = tiny(family)
    hf = lh.wrap(model)
    short, longer = prompt(1, 2, seed=5), prompt(1, 4, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1), longer])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    n = min(8, model.config.max_seq_len - 4)
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=False)
    assert torch.equal(out[0, 4:], model.generate(short, n, temperature=0)[0])
    assert torch.equal(out[1, 4:], model.generate(longer, n, temperature=0)[0])


def test_text_generation_pipeline(tmp_path, saved_lr):
    model, lr_dir = saved_lr("vanilla")
    lh.export_hf(lr_dir, tmp_path / "hf")
    generator = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    text = "def main():\n"
    result = generator(text, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    tok = ByteTokenizer()
    native = model.generate(tok.encode(text), 12, temperature=0)
    assert result == text + tok.decode(native).replace("\x00", "")
