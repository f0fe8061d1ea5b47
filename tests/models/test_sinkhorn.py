"""models/sinkhorn: the family through the shared flow and the reference's names.

Strict causality (local heads, n_top_buckets 1 and 2), padding masks, fast == naive,
incremental decoding == full recompute, values reordered (where the reference fails),
parity with sinkhorn-transformer after converting its weights, the encoder-decoder learning
a copy task, the reference's wrapper / Autopadder conventions and input checks."""

from __future__ import annotations

import pytest
import torch

from longrange import convert
from longrange.models.registry import create_model
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
from longrange.testing import (
    assert_causal,
    assert_close,
    assert_padding_ignored,
    import_reference,
    relative_error,
)

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


# --- the family ------------------------------------------------------------------------------
def test_presets_and_round_trip(tmp_path):
    for preset in ("tiny", "small", "bench"):
        model = create_model("sinkhorn", preset=preset, max_seq_len=256)
        assert model.config.causal and model.num_params() > 0
    model = create_model("sinkhorn", preset="tiny").eval()
    x = tokens(2, 37)
    assert model(x).shape == (2, 37, 256)
    model.save_pretrained(tmp_path)
    again = SinkhornLM.from_pretrained(tmp_path).eval()
    assert again.config == model.config
    assert torch.equal(again(x), model(x))


CAUSAL = [
    ("ntop1-local", dict(n_top_buckets=1, n_local_attn_heads=2)),
    ("ntop2-local", dict(n_top_buckets=2, n_local_attn_heads=1)),
    ("ntop2-simple-reversible", dict(n_top_buckets=2, use_simple_sort_net=True, reversible=True)),
    ("ntop3-one-head", dict(n_top_buckets=3, heads=1)),
]


@pytest.mark.parametrize("kw", [c[1] for c in CAUSAL], ids=[c[0] for c in CAUSAL])
def test_causal_lm_is_strictly_causal(kw):
    model = lm(**kw)
    x = tokens(2, 44, seed=1)
    assert_causal(lambda t: model(t), x, V, positions=[0, 3, 4, 10, 21, 31, 42])


@pytest.mark.parametrize("kw", [c[1] for c in CAUSAL[:3]], ids=[c[0] for c in CAUSAL[:3]])
def test_incremental_decoding_equals_full_recompute(kw):
    model = lm(**kw)
    x = tokens(2, 31, seed=2)
    with torch.no_grad():
        full = model(x)
        logits, state = model.prefill(x[:, :6])
        rows = [logits]
        for t in range(6, 31):
            step, state = model.step(x[:, t], state)
            rows.append(step[:, None])
    assert_close(torch.cat(rows, dim=1), full, 1e-4)
    prompt = x[:, :9]
    greedy = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq[:, 9:])


def test_padding_masks_follow_the_reordering():
    x = tokens(2, 40, seed=3)
    left = torch.ones(2, 40, dtype=torch.bool)
    left[0, :13] = False  # a left-padded causal batch
    causal = lm(n_local_attn_heads=1)
    assert_padding_ignored(lambda t, m: causal.forward_lm(t, mask=m).logits, x, left, V)
    holes = torch.rand(2, 40, generator=torch.Generator().manual_seed(4)) < 0.7
    holes[1, 8:16] = False  # a whole padded bucket
    for kw in (dict(n_sortcut=2), dict(n_top_buckets=2), dict(non_permutative=False, kv_bucket_size=8)):
        model = lm(causal=False, **kw)
        assert_padding_ignored(lambda t, m, model=model: model.forward_lm(t, mask=m).logits, x, holes, V)


def test_any_length_runs_and_padding_does_not_change_real_positions():
    model = lm(causal=False, n_sortcut=2)
    x = tokens(1, 30, seed=5)
    padded = torch.cat([x, tokens(1, 2, seed=6)], dim=1)
    mask = torch.arange(32)[None] < 30
    assert_close(model(x), model.forward_lm(padded, mask=mask).logits[:, :30], 1e-5)


@pytest.mark.parametrize(
    "kw",
    [dict(n_local_attn_heads=1), dict(causal=False, n_sortcut=2), dict(causal=False, non_permutative=False)],
    ids=["causal", "sortcut", "sinkhorn"],
)
def test_fast_equals_naive_backend(kw):
    fast, naive = lm(**kw), lm(attn_backend="naive", **kw)
    naive.load_state_dict(fast.state_dict())
    x = tokens(2, 24, seed=7)
    out_f, out_n = fast(x), naive(x)
    assert_close(out_f, out_n, 1e-5)
    out_f.square().mean().backward()
    out_n.square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), naive.parameters()):
        if b.grad is not None:
            assert_close(a.grad, b.grad, 1e-4, name=name)


def test_eval_is_deterministic_training_draws_gumbel_noise():
    model = lm(causal=False, non_permutative=False)
    x = tokens(1, 24, seed=8)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


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


def test_causal_padding_follows_n_top_buckets():
    """With one null bucket the reference's mask, padded for two, shifts the key masks."""
    model = lm(n_top_buckets=1, n_local_attn_heads=0)
    x = tokens(1, 32, seed=10)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, :5] = False
    assert_padding_ignored(lambda t, m: model.forward_lm(t, mask=m).logits, x, mask, V)


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
    wrapper = AutoregressiveWrapper(model)
    assert wrapper.ignore_index == 0 and wrapper.pad_value == 0
    x = tokens(2, 21, seed=12)
    assert wrapper(x).shape == (2, 21, V)  # return_loss defaults to False
    loss = wrapper(x, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(wrapper([x[0, :9], x[1, :15]], return_loss=True))
    assert torch.isfinite(wrapper(x, return_loss=True, randomly_truncate_sequence=True))
    out = wrapper.generate(x[:, :5], 6)
    assert out.shape == (2, 6)
    prompt_mask = torch.ones(2, 5, dtype=torch.bool)
    prompt_mask[0, :2] = False  # a left-padded prompt, as the reference's generate takes it
    assert wrapper.generate(x[:, :5], 4, input_mask=prompt_mask).shape == (2, 4)

    body = SinkhornTransformer(dim=32, depth=1, heads=2, bucket_size=8, n_sortcut=1, receives_context=True)
    padder = Autopadder(body)
    h, ctx = torch.randn(2, 13, 32), torch.randn(2, 11, 32)
    assert padder(h, context=ctx).shape == (2, 13, 32)
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
    # the decoder decodes incrementally with the context, as the full decoder computes
    dec = model.dec.net
    context = model.enc(src)
    with torch.no_grad():
        full = dec(tgt, context=context)
        logits, state = dec.prefill(tgt[:, :3], context=context)
        step, _ = dec.step(tgt[:, 3], state)
    assert_close(logits, full[:, :3], 1e-4)
    assert_close(step, full[:, 3], 1e-4)


# --- input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(causal=True, n_sortcut=2), "n_sortcut"),
        (dict(n_local_attn_heads=5), "n_local_attn_heads"),
        (dict(causal=True, kv_bucket_size=8), "kv_bucket_size"),
        (dict(pkm_layers=(3,)), "pkm_layers"),
        (dict(temperature=0.0), "temperature"),
        (dict(bucket_size=0), "bucket_size"),
        (dict(attn_dropout=1.0), "attn_dropout"),
    ],
    ids=[
        "sortcut-causal",
        "local-heads",
        "kv-bucket-causal",
        "pkm-layer",
        "temperature",
        "bucket",
        "dropout",
    ],
)
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SinkhornConfig(vocab_size=V, dim=32, depth=2, heads=4, **bad)


def test_bad_inputs_are_refused():
    model = lm()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 49))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="receives_context"):
        model.run(tokens(1, 8), context=torch.randn(1, 8, 32))
    with pytest.raises(TypeError, match="unknown keyword"):
        SinkhornTransformerLM(num_tokens=V, dim=32, depth=1, max_seq_len=32, bucket_sizes=8)
    fixed = SinkhornTransformerLM(
        num_tokens=V, dim=32, depth=1, max_seq_len=32, bucket_size=8, use_simple_sort_net=True
    )
    assert fixed(tokens(1, 20)).shape == (1, 20, V)  # padded to the fixed length, masked
    with pytest.raises(ValueError, match="causal"):
        lm(causal=False).prefill(tokens(1, 4), context=torch.randn(1, 4, 32))


def test_non_causal_models_generate_by_recomputing():
    model = lm(causal=False, n_sortcut=2)
    out = AutoregressiveWrapper(model).generate(tokens(1, 6), 5)
    assert out.shape == (1, 5)
    assert model.generate(tokens(1, 6), 4, temperature=0).shape == (1, 4)


KEYWORDS = [
    (
        "dropouts",
        dict(ff_dropout=0.1, attn_dropout=0.1, emb_dropout=0.1, layer_dropout=0.3, attn_layer_dropout=0.1),
    ),
    ("context-bucket", dict(receives_context=True, context_bucket_size=8, context_n_sortcut=1, causal=False)),
    ("embeddings", dict(emb_dim=24, return_embeddings=True, ff_chunks=3, ff_glu=True)),
    ("axial-sinkhorn", dict(axial_shape=(4, 4, 4), causal=False, non_permutative=False, sinkhorn_iter=3)),
]


@pytest.mark.parametrize("kw", [c[1] for c in KEYWORDS], ids=[c[0] for c in KEYWORDS])
def test_keywords_train(kw):
    model = lm(**kw).train()
    x = tokens(2, 29, seed=13)
    extra = {"context": torch.randn(2, 13, 32)} if kw.get("receives_context") else {}
    out = model.run(x, **extra)
    width = 32 if kw.get("return_embeddings") else V
    assert out.shape == (2, 29, width)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_without_nan(dtype):
    for kw in (dict(n_local_attn_heads=1), dict(causal=False, n_sortcut=2)):
        model = lm(**kw).to(dtype)
        x = tokens(2, 30, seed=14)
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[0, :9] = False
        out = model.forward_lm(x, mask=mask).logits
        out.float().square().mean().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
