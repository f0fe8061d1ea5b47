"""models/sinkhorn, the reference's side: sinkhorn-transformer's names, keywords, defaults and
return conventions (wrapper, Autopadder, stack, encoder-decoder), parity after converting its
weights, and the reference's defects that ours does not have."""

from __future__ import annotations

import pytest
import torch

from longrange import convert
from longrange.models.reference_init import init_mismatches
from longrange.models.sinkhorn import (
    Autopadder,
    AutoregressiveWrapper,
    SinkhornConfig,
    SinkhornLM,
    SinkhornSelfAttention,
    SinkhornTransformer,
    SinkhornTransformerEncDec,
    SinkhornTransformerLM,
)
from longrange.ops.sinkhorn import dense_selection, sinkhorn_attention_naive
from longrange.ops.sinkhorn.layout import split_heads
from longrange.testing import assert_close, import_reference, relative_error

V = 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: threads only add contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(b, n, seed=0):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def lm(**kw) -> SinkhornLM:
    base = dict(vocab_size=V, dim=32, depth=2, heads=4, bucket_size=4, max_seq_len=48)
    torch.manual_seed(0)
    return SinkhornLM(SinkhornConfig(**{**base, **kw})).eval()


# --- the reference's defects, fixed ------------------------------------------------------------
def test_values_are_reordered_with_the_keys():
    ref = import_reference("sinkhorn_transformer.sinkhorn_transformer")
    torch.manual_seed(0)
    ours = SinkhornSelfAttention(32, 4, 32, heads=2, n_top_buckets=2).eval()
    theirs = ref.SinkhornSelfAttention(32, 4, 32, heads=2, n_top_buckets=2).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        (q,) = split_heads(ours.to_q(x), 1, 2)
        k, v = split_heads(ours.to_kv(x), 2, 2)
        choice = ours.sinkhorn_attention.sort_net(q, k, topk=2)
        reorder = dense_selection(
            choice.indices.flatten(2)[..., None], choice.weights.flatten(2)[..., None], 8
        )
        rows = torch.arange(8)[:, None] * 2 + torch.arange(2)

        def expected(values):
            out = sinkhorn_attention_naive(
                q,
                k,
                values,
                bucket_size=4,
                kv_bucket_size=4,
                reorder=reorder,
                row_index=rows,
                include_own=True,
            )
            return ours.to_out(out.transpose(1, 2).flatten(2))

        assert_close(ours(x), expected(v), 1e-5)
        assert relative_error(theirs(x), expected(v)) > 1e-2  # the reference fails this


def test_context_attention_projects_the_context():
    layer = SinkhornSelfAttention(32, 4, 16, heads=2, context_only=True, n_sortcut=1)
    assert layer.to_kv.weight.shape == (64, 32)
    x, ctx = torch.randn(1, 16, 32), torch.randn(1, 8, 32)
    out = layer(x, context=ctx)
    out.sum().backward()
    assert layer.to_kv.weight.grad.abs().sum() > 0


# --- reference parity --------------------------------------------------------------------------
PARITY = [
    ("causal-ntop2", dict(causal=True)),
    ("causal-ntop1-local", dict(causal=True, n_top_buckets=1, n_local_attn_heads=2)),
    ("causal-reversible-glu", dict(causal=True, reversible=True, ff_chunks=2, ff_glu=True)),
    ("causal-tied-rezero", dict(causal=True, weight_tie=True, use_rezero=True)),
    ("causal-emb-dim-pkm", dict(causal=True, emb_dim=16, pkm_layers=(2,), pkm_num_keys=32)),
    ("causal-simple", dict(causal=True, use_simple_sort_net=True, dim_head=4)),
    ("sortcut", dict(n_sortcut=2)),
    ("sortcut-kv-bucket-local", dict(n_sortcut=2, kv_bucket_size=16, n_local_attn_heads=1)),
    ("sortcut-simple", dict(n_sortcut=2, use_simple_sort_net=True)),
]


@pytest.mark.parametrize("kw", [c[1] for c in PARITY], ids=[c[0] for c in PARITY])
def test_reference_parity(kw):
    ref = import_reference("sinkhorn_transformer")
    base = dict(num_tokens=V, dim=32, depth=2, max_seq_len=64, heads=4, bucket_size=8)
    torch.manual_seed(0)
    theirs = ref.SinkhornTransformerLM(**base, **kw).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))  # ReZero gates and null keys away from their init
    ours = convert.load_reference(SinkhornTransformerLM(**base, **kw).eval(), theirs.state_dict())
    x = tokens(2, 64, seed=11)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-4)


def test_reference_parity_with_context():
    ref = import_reference("sinkhorn_transformer")
    base = dict(
        dim=32, depth=1, heads=4, bucket_size=8, n_sortcut=2, context_n_sortcut=2, receives_context=True
    )
    base.update(non_permutative=True)  # the reference draws Gumbel noise even in eval otherwise
    torch.manual_seed(0)
    theirs = ref.SinkhornTransformer(**base).eval()
    ours = convert.load_reference(SinkhornTransformer(**base).eval(), theirs.state_dict())
    x, ctx = torch.randn(2, 32, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert_close(ours(x, context=ctx), theirs(x, context=ctx), 1e-4)


def test_converter_refuses_a_mismatch():
    ref = import_reference("sinkhorn_transformer")
    theirs = ref.SinkhornTransformerLM(num_tokens=V, dim=32, depth=2, max_seq_len=64, heads=4, bucket_size=8)
    ours = SinkhornTransformerLM(num_tokens=V, dim=32, depth=1, max_seq_len=64, heads=4, bucket_size=8)
    with pytest.raises(ValueError, match="no counterpart"):
        convert.load_reference(ours, theirs.state_dict())


# --- compatibility classes ---------------------------------------------------------------------
def test_reference_wrapper_and_autopadder_conventions():
    model = SinkhornTransformerLM(
        num_tokens=V, dim=32, depth=1, max_seq_len=32, heads=2, bucket_size=8, causal=True
    )
    wrapper = AutoregressiveWrapper(model).eval()
    assert wrapper.ignore_index == 0 and wrapper.pad_value == 0
    x = tokens(2, 21, seed=12)
    assert torch.equal(wrapper(x), model(x))  # return_loss defaults to False
    x[1, 7] = 0  # the pad value is the ignored target

    def next_token_loss(inputs, targets):
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=0)

    assert_close(wrapper(x, return_loss=True), next_token_loss(x[:, :-1], x[:, 1:]), 1e-6)
    rows = [x[0, :9], x[1, :15]]  # ragged rows are padded on the right with pad_value
    ragged = torch.stack([torch.cat([x[0, :9], torch.zeros(6, dtype=torch.long)]), x[1, :15]])
    assert_close(wrapper(rows, return_loss=True), next_token_loss(ragged[:, :-1], ragged[:, 1:]), 1e-6)
    assert torch.isfinite(wrapper(x, return_loss=True, randomly_truncate_sequence=True))
    # sampling on the bucket caches draws what re-running the net (a prompt mask) draws
    torch.manual_seed(3)
    out = wrapper.generate(x[:, :5], 6)
    torch.manual_seed(3)
    assert torch.equal(out, wrapper.generate(x[:, :5], 6, input_mask=torch.ones(2, 5, dtype=torch.bool)))
    prompt_mask = torch.ones(2, 5, dtype=torch.bool)
    prompt_mask[0, :2] = False  # a left-padded prompt, as the reference's generate takes it
    noisy = x[:, :5].clone()
    noisy[0, :2] = 3
    torch.manual_seed(4)
    out = wrapper.generate(x[:, :5], 4, input_mask=prompt_mask)
    torch.manual_seed(4)
    assert torch.equal(out, wrapper.generate(noisy, 4, input_mask=prompt_mask))

    body = SinkhornTransformer(dim=32, depth=1, heads=2, bucket_size=8, n_sortcut=1, receives_context=True)
    body.eval()
    padder = Autopadder(body)
    h, ctx = torch.randn(2, 13, 32), torch.randn(2, 11, 32)
    junk = torch.cat([h, torch.randn(2, 3, 32)], dim=1)  # padded by hand with other values
    keep = torch.arange(16)[None].expand(2, 16) < 13
    by_hand = padder(junk, input_mask=keep, context=ctx)[:, :13]
    assert_close(padder(h, context=ctx), by_hand, 1e-5)
    left = Autopadder(body, pad_left=True)(h, context=ctx)
    assert left.shape == (2, 13, 32) and torch.isfinite(left).all()
    with pytest.raises(ValueError, match="divisible"):
        body(h, context=ctx)


def test_encoder_decoder_learns_to_copy():
    torch.manual_seed(0)
    n = 12
    model = SinkhornTransformerEncDec(
        dim=64, enc_num_tokens=12, enc_depth=1, enc_max_seq_len=n, enc_heads=2, enc_bucket_size=4,
        enc_n_sortcut=2, dec_num_tokens=12, dec_depth=1, dec_max_seq_len=n + 1, dec_heads=2,
        dec_bucket_size=4, dec_n_local_attn_heads=1, dec_n_top_buckets=2,
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(b):
        src = torch.randint(2, 12, (b, n), generator=gen)
        return src, torch.cat([torch.ones(b, 1, dtype=torch.long), src], dim=1)

    for _ in range(120):
        src, tgt = batch(32)
        loss = model(src, tgt, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, tgt = batch(32)
    out = model.generate(src, tgt[:, :1], n, temperature=1e-3, filter_thres=0.5)
    assert (out == src).float().mean() > 0.95
    # the decoder decodes incrementally with the context (kept in its state), as the full
    # decoder computes: a prefill, a continuing prefill across a bucket boundary, a step
    dec = model.dec.net
    context = model.enc(src)
    with torch.no_grad():
        full = dec(tgt, context=context)
        logits, state = dec.prefill(tgt[:, :3], context=context)
        more, _ = dec.prefill(tgt[:, 3:6], state)
        step, _ = dec.step(tgt[:, 6], state)
    assert_close(torch.cat([logits, more, step[:, None]], dim=1), full[:, :7], 1e-4)


def test_non_causal_models_generate_by_recomputing():
    model = lm(causal=False, n_sortcut=2)
    seq = tokens(1, 6)
    greedy = model.generate(seq, 4, temperature=0)
    for _ in range(4):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, seq[:, 6:])
    # the reference wrapper keeping one token per step samples the same tokens
    assert torch.equal(AutoregressiveWrapper(model).generate(tokens(1, 6), 4, filter_thres=1.0), greedy)


@pytest.mark.parametrize(
    "options",
    [dict(causal=True), dict(n_sortcut=2, non_permutative=False, use_rezero=True, ff_glu=True)],
    ids=["causal", "sortcut-rezero-glu"],
)
def test_initialises_like_the_reference(options):
    """sinkhorn_transformer leaves every layer at PyTorch's defaults (N(0, 1) token and axial
    position embeddings, N(0, 1) null keys and sort-net weights); so do we."""
    ref = import_reference("sinkhorn_transformer")
    kw = dict(num_tokens=256, dim=256, depth=2, max_seq_len=256, heads=4, bucket_size=32, **options)
    assert init_mismatches(lambda: SinkhornTransformerLM(**kw), lambda: ref.SinkhornTransformerLM(**kw)) == []
    stack = dict(dim=256, depth=2, heads=4, bucket_size=32)
    assert (
        init_mismatches(lambda: SinkhornTransformer(**stack), lambda: ref.SinkhornTransformer(**stack)) == []
    )
