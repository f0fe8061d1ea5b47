"""models/performer, the reference's side: ``performer_pytorch``'s names, keywords, defaults and
call conventions (wrapper, encoder-decoder, stack, layers), parity after converting its
weights, and the reference's defects (future and padding leaks) that ours does not have."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

from longrange.convert import load_reference
from longrange.models.performer import (
    AutoregressiveWrapper,
    CrossAttention,
    FastAttention,
    Performer,
    PerformerEncDec,
    PerformerLM,
    SelfAttention,
)
from longrange.models.reference_init import init_mismatches
from longrange.testing import (
    assert_causal,
    assert_close,
    assert_padding_ignored,
    import_reference,
    relative_error,
)

VOCAB = 40
SMALL = dict(num_tokens=VOCAB, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16)


def tokens(batch, n, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def converted_lms(train: bool = False, **kw) -> tuple[nn.Module, PerformerLM]:
    """performer_pytorch's PerformerLM(**kw) from seed 0 (its causal warning silenced) and ours
    with its weights converted, both in training or eval mode."""
    ref = import_reference("performer_pytorch")
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = ref.PerformerLM(**kw).train(train)
    ours = PerformerLM(**kw).train(train)
    load_reference(ours, theirs.state_dict())
    return theirs, ours


def lm(**overrides) -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(**{**SMALL, "causal": True, "nb_features": 24, **overrides}).eval()


def test_reference_leaks_the_future_and_we_do_not():
    """performer_pytorch's sequence-wide key max lets later tokens change earlier logits."""
    theirs, ours = converted_lms(**SMALL, causal=True, nb_features=24)
    x = tokens(1, 48, seed=3)
    with pytest.raises(AssertionError, match="not causal"):
        assert_causal(theirs, x, VOCAB, positions=[10, 30], atol=1e-6)
    assert_causal(ours, x, VOCAB, positions=[10, 30], atol=1e-6)


def test_reference_padding_leaks_and_ours_does_not():
    """performer_pytorch zeroes masked values but keeps masked keys in the normaliser."""
    theirs, ours = converted_lms(**SMALL)
    x = tokens(2, 30, seed=4)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[:, 20:] = False
    with pytest.raises(AssertionError, match="padding leaks"):
        assert_padding_ignored(lambda t, m: theirs(t, mask=m), x, mask, VOCAB)
    assert_padding_ignored(lambda t, m: ours(t, mask=m), x, mask, VOCAB)


def test_autoregressive_wrapper_and_reference_defaults():
    model = lm()
    wrapper = AutoregressiveWrapper(model)
    assert wrapper.ignore_index == 0 and wrapper.pad_value == 0
    x = tokens(2, 20)
    x[0, 12] = 0  # a target of 0 is ignored, as in the reference
    loss = wrapper(x, mask=torch.ones(2, 20, dtype=torch.bool))
    logits = model(x[:, :-1])
    want = nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], ignore_index=0)
    assert_close(loss, want, 1e-6)
    # sampling on the running sums draws what re-running the net (a prompt mask) draws
    torch.manual_seed(1)
    sampled = wrapper.generate(x[:, :5], 7, filter_thres=0.5)
    torch.manual_seed(1)
    rerun = wrapper.generate(x[:, :5], 7, filter_thres=0.5, mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(sampled, rerun)


def test_encoder_decoder_with_cross_attention():
    torch.manual_seed(0)
    model = PerformerEncDec(
        dim=32,
        enc_num_tokens=VOCAB,
        enc_depth=1,
        enc_heads=2,
        enc_max_seq_len=32,
        enc_dim_head=16,
        dec_num_tokens=VOCAB,
        dec_depth=2,
        dec_heads=2,
        dec_max_seq_len=40,
        dec_dim_head=16,
        dec_nb_features=24,
    ).eval()
    src, tgt = tokens(2, 20, seed=1), tokens(2, 15, seed=2)
    enc_mask = torch.ones(2, 20, dtype=torch.bool)
    enc_mask[0, 14:] = False
    loss = model(src, tgt, enc_mask=enc_mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # masked context positions do not matter
    noisy = src.clone()
    noisy[0, 14:] = 7
    assert_close(model(noisy, tgt, enc_mask=enc_mask), loss, 1e-6)
    # the decoder's state holds the context: prefill, a continuing prefill and steps equal
    # the full decoder
    dec = model.dec.net
    enc = model.enc(src, mask=enc_mask, return_encodings=True)
    with torch.no_grad():
        full = dec(tgt, context=enc, context_mask=enc_mask)
        first, state = dec.prefill(tgt[:, :5], context=enc, context_mask=enc_mask)
        more, _ = dec.prefill(tgt[:, 5:9], state)
        step, _ = dec.step(tgt[:, 9], state)
    assert state.shared["context"] is enc
    assert_close(torch.cat((first, more, step[:, None]), 1), full[:, :10], 1e-5)
    with pytest.raises(ValueError, match="context"):
        dec.prefill(tgt[:, :3])
    # generation with the context in the decoder's state == greedy recompute
    torch.manual_seed(3)
    out = model.generate(src, tgt[:, :4], 6, enc_mask=enc_mask, filter_thres=0.99, temperature=1e-4)
    seq = tgt[:, :4]
    for i in range(6):
        nxt = dec(seq, context=enc, context_mask=enc_mask)[:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, i])
        seq = torch.cat((seq, nxt[:, None]), dim=1)


def _changed_after(x: torch.Tensor, t: int) -> torch.Tensor:
    changed = x.clone()
    changed[:, t:] = torch.randn(changed[:, t:].shape, generator=torch.Generator().manual_seed(9))
    return changed


def test_layers_and_stack_keep_reference_call_conventions():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 32)
    stack = Performer(dim=32, depth=2, heads=2, dim_head=16, causal=True, nb_features=16).eval()
    attn = SelfAttention(32, causal=True, heads=2, dim_head=16, local_heads=1, local_window_size=4)
    with torch.no_grad():
        for causal_layer in (stack, attn):  # positions before 7 never see what follows
            assert_close(causal_layer(_changed_after(x, 7))[:, :7], causal_layer(x)[:, :7], 1e-6)
    with pytest.raises(ValueError, match="context"):
        attn(x, context=x)
    cross = CrossAttention(32, heads=2, dim_head=16)
    context, keep = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        masked = cross(x, context=_changed_after(context, 3), context_mask=keep)
        assert_close(masked[1], cross(x, context=context, context_mask=keep)[1], 1e-6)
    with pytest.raises(ValueError, match="context"):
        cross(x)
    fast = FastAttention(16, nb_features=20)
    before = fast.projection_matrix.clone()
    fast.redraw_projection_matrix("cpu")
    assert not torch.equal(before, fast.projection_matrix)
    with pytest.raises(ValueError, match="context"):
        lm()(tokens(1, 5), context=torch.randn(1, 3, 32))
    bidirectional = lm(causal=False)
    encodings = bidirectional(tokens(1, 5), return_encodings=True)
    assert_close(bidirectional.to_out(encodings), bidirectional(tokens(1, 5)), 1e-6)
    # no running state without causality: generation re-runs the window
    seq = tokens(1, 5)
    new = bidirectional.generate(seq, 3, temperature=0)
    for _ in range(3):
        seq = torch.cat((seq, bidirectional(seq)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(new, seq[:, 5:])


BAD_KEYWORDS = [
    ("scalenorm-and-rezero", dict(use_scalenorm=True, use_rezero=True), "use_scalenorm"),
    ("rotary-and-axial", dict(axial_position_emb=True), "axial_position_emb"),
    ("kernel-without-generalized", dict(kernel_fn=nn.GELU()), "kernel_fn"),
    ("features-without-projection", dict(no_projection=True), "nb_features"),
    ("too-many-local-heads", dict(local_attn_heads=3), "local_attn_heads"),
    ("local-heads-per-layer", dict(local_attn_heads=(1, 1, 1)), "local_attn_heads"),
    ("unknown", dict(bucket_size=4), "bucket_size"),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in BAD_KEYWORDS], ids=[c[0] for c in BAD_KEYWORDS])
def test_keywords_that_cannot_be_honoured_raise(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lm(**kw)


def test_custom_kernel_function():
    model = lm(generalized_attention=True, kernel_fn=torch.nn.Softplus(beta=2.0))
    assert model.config.kernel_fn == "custom"
    assert torch.isfinite(model(tokens(1, 9))).all()
    named = lm(generalized_attention=True, kernel_fn=nn.ELU())
    assert named.config.kernel_fn == "elu"


PARITY_CASES = [
    ("plain", {}),
    ("local-heads", dict(local_attn_heads=1, local_window_size=16)),
    ("shift-scalenorm", dict(shift_tokens=True, use_scalenorm=True)),
    ("reversible-rezero", dict(reversible=True, use_rezero=True)),
    (
        "generalized-glu-bias",
        dict(generalized_attention=True, ff_glu=True, qkv_bias=True, attn_out_bias=True),
    ),
    ("no-projection-tied", dict(no_projection=True, tie_embed=True)),
    # kernels with negative values: a row's kernel sum may be negative (it was replaced by 1)
    ("generalized-elu", dict(generalized_attention=True, kernel_fn=nn.ELU())),
    ("generalized-tanh", dict(generalized_attention=True, kernel_fn=nn.Tanh())),
    ("generalized-gelu", dict(generalized_attention=True, kernel_fn=nn.GELU())),
    ("axial", dict(rotary_position_emb=False, axial_position_emb=True, axial_position_shape=(8, 8))),
    ("absolute-cross", dict(rotary_position_emb=False, cross_attend=True)),
]


@pytest.mark.parametrize("kw", [c[1] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_non_causal_parity_with_reference(kw):
    theirs, ours = converted_lms(**SMALL, **kw)
    x = tokens(2, 64, seed=6)
    extra = {"context": torch.randn(2, 10, 32)} if kw.get("cross_attend") else {}
    with torch.no_grad():
        assert relative_error(ours(x, **extra), theirs(x, **extra)) < 1e-4


@pytest.mark.parametrize("kernel", [nn.ELU(), nn.Tanh()], ids=["elu", "tanh"])
def test_causal_parity_with_reference_for_kernels_with_negative_values(kernel):
    # the generalized kernels carry no stabiliser, so causal outputs equal the reference's;
    # with a signed kernel a prefix's kernel sum may be negative (it was replaced by 1)
    theirs, ours = converted_lms(**SMALL, causal=True, generalized_attention=True, kernel_fn=kernel)
    x = tokens(2, 64, seed=6)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) < 1e-4


def test_non_causal_training_gradients_equal_the_reference():
    """The reference's own defaults (non-causal, softmax kernel with its epsilon) in training:
    the loss and every parameter's gradient equal performer_pytorch's, converted like weights."""
    theirs, ours = converted_lms(train=True, **SMALL)
    x = tokens(2, 65, seed=7)
    losses = []
    for model in (ours, theirs):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[0], losses[1], 1e-5)
    grads = dict(theirs.state_dict())
    grads.update((n, torch.zeros_like(p) if p.grad is None else p.grad) for n, p in theirs.named_parameters())
    expected = dict(load_reference(PerformerLM(**SMALL), grads).named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, expected[name].detach(), 1e-4, name=name)


def test_causal_difference_from_reference_is_the_stabiliser_defect():
    """Same weights and projections: the causal outputs differ only by the reference's global
    key max and feature epsilon (about 3e-4 relative here); with the future fixed, swapping in
    the reference's stabiliser on our side would be exact."""
    theirs, ours = converted_lms(**SMALL, causal=True)
    x = tokens(2, 64, seed=6)
    with torch.no_grad():
        err = relative_error(ours(x), theirs(x))
    assert 1e-6 < err < 1e-2


def test_stack_parity_with_reference():
    ref = import_reference("performer_pytorch")
    kw = dict(dim=32, depth=2, heads=2, dim_head=16, shift_tokens=True, nb_features=20)
    torch.manual_seed(0)
    theirs = ref.Performer(**kw).eval()
    ours = Performer(**kw).eval()
    load_reference(ours, theirs.state_dict())
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) < 1e-4


def test_converter_refuses_mismatched_models():
    ref = import_reference("performer_pytorch")
    theirs = ref.PerformerLM(**SMALL)
    with pytest.raises(ValueError, match="do not match"):
        load_reference(PerformerLM(**{**SMALL, "depth": 1}), theirs.state_dict())


def _enc_dec(**kw) -> PerformerEncDec:
    sides = dict(num_tokens=VOCAB, depth=1, max_seq_len=32)
    prefixed = {f"{p}{k}": v for p in ("enc_", "dec_") for k, v in sides.items()}
    return PerformerEncDec(dim=32, **prefixed, **{"heads": 2, **kw})


def test_enc_dec_unprefixed_keywords_set_both_sides_and_readme_spellings_run():
    model = _enc_dec(heads=4, nb_features=16, dim_head=8, enc_heads=2)
    enc, dec = model.enc.config, model.dec.net.config
    assert (enc.heads, dec.heads) == (2, 4)  # a prefixed keyword wins for its side
    assert enc.nb_features == dec.nb_features == 16 and enc.dim_head == dec.dim_head == 8
    with pytest.warns(UserWarning, match="'tie_token_embed' is taken as 'tie_token_embeds'"):
        tied = _enc_dec(tie_token_embed=True)
    assert tied.enc.token_emb is tied.dec.net.token_emb
    with pytest.raises(TypeError, match="both tie_token_embed and tie_token_embeds"):
        _enc_dec(tie_token_embed=True, tie_token_embeds=True)
    with pytest.raises(
        TypeError, match=r"enc_ or dec_ prefix or name an option of both sides, got \['beams'\]"
    ):
        _enc_dec(beams=4)
    with pytest.raises(TypeError, match="fixed on the decoder"):
        _enc_dec(causal=True)
    with pytest.raises(TypeError, match="enc_ or dec_"):  # call-time keywords keep their prefix
        model(tokens(1, 8), tokens(1, 8), mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.warns(UserWarning, match="'tie_embedding' is taken as 'tie_embed'"):
        assert PerformerLM(**SMALL, tie_embedding=True).config.tie_embed
    with pytest.raises(TypeError, match="both tie_embedding and tie_embed"):
        PerformerLM(**SMALL, tie_embedding=True, tie_embed=True)


class _Ramp(nn.Module):
    """Logits 0, 1, ..., V - 1 at every position: the greedy choice is always V - 1."""

    max_seq_len = 64

    def forward(self, x, mask=None):
        return torch.arange(VOCAB, dtype=torch.float).expand(*x.shape, VOCAB)


def test_wrapper_repetition_penalty_reads_each_row_s_recent_tokens():
    wrapper = AutoregressiveWrapper(_Ramp())
    greedy = dict(filter_thres=1.0, repetition_penalty=100.0, repetition_penalty_ctx=2)
    prompt = torch.tensor([[0, 0], [39, 38]])
    out = wrapper.generate(prompt, 6, **greedy)
    # the two most recent tokens of the row are held down, so the top three take turns
    assert out.tolist() == [[39, 38, 37, 39, 38, 37], [37, 39, 38, 37, 39, 38]]
    assert wrapper.generate(prompt, 3, filter_thres=1.0).tolist() == [[39] * 3] * 2
    with pytest.raises(ValueError, match="repetition_penalty_ctx"):
        wrapper.generate(prompt, 2, repetition_penalty=1.2, repetition_penalty_ctx=0)


def test_sliding_generation_samples_the_reference_s_tokens():
    """With ``window="slide"`` the wrapper samples what performer_pytorch's wrapper samples
    for the same seed and weights, also past max_seq_len; the default restarts there."""
    ref = import_reference("performer_pytorch")
    ref_wrapper = import_reference("performer_pytorch.autoregressive_wrapper").AutoregressiveWrapper
    # local heads only: logits equal to float rounding (FAVOR's stabiliser differs, see above)
    kw = dict(num_tokens=VOCAB, max_seq_len=16, dim=32, depth=2, heads=2, dim_head=16, causal=True)
    kw.update(local_attn_heads=2, local_window_size=8)
    torch.manual_seed(0)
    theirs = ref.PerformerLM(**kw)
    ours = load_reference(PerformerLM(**kw), theirs.state_dict())
    prompt = tokens(2, 5, seed=1)
    samples = {}
    for name, wrapper, extra in (
        ("reference", ref_wrapper(theirs), {}),
        ("slide", AutoregressiveWrapper(ours), dict(window="slide")),
        ("restart", AutoregressiveWrapper(ours), {}),
    ):
        torch.manual_seed(5)
        samples[name] = wrapper.generate(prompt, 30, filter_thres=0.5, **extra)
    assert torch.equal(samples["slide"], samples["reference"])
    assert torch.equal(samples["restart"][:, :11], samples["reference"][:, :11])  # window not full
    assert not torch.equal(samples["restart"], samples["reference"])


@pytest.mark.parametrize(
    "options",
    [dict(causal=True, local_attn_heads=1), dict(rotary_position_emb=False, ff_glu=True, use_rezero=True)],
    ids=["causal-local", "absolute-glu-rezero"],
)
def test_initialises_like_the_reference(options):
    """performer_pytorch leaves every layer at PyTorch's defaults; so do we."""
    ref = import_reference("performer_pytorch")
    kw = dict(num_tokens=256, max_seq_len=256, dim=256, depth=2, heads=4, **options)
    with contextlib.redirect_stdout(io.StringIO()):
        assert init_mismatches(lambda: PerformerLM(**kw), lambda: ref.PerformerLM(**kw)) == []
    stack = dict(dim=256, depth=2, heads=4, dim_head=64)
    assert init_mismatches(lambda: Performer(**stack), lambda: ref.Performer(**stack)) == []
