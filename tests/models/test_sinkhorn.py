"""models/sinkhorn: the family through the shared flow.

Strict causality (local heads, n_top_buckets 1 and 2), padding masks, fast == naive,
incremental decoding == full recompute with the options the shared protocol tests do not use
(one top bucket, the simple sort net, reversible), input checks, training with every keyword,
half precision. The reference's side is in test_sinkhorn_compat.py."""

from __future__ import annotations

import pytest
import torch

from longrange.models.registry import create_model
from longrange.models.sinkhorn import SinkhornConfig, SinkhornLM, SinkhornTransformerLM
from longrange.models.state import State
from longrange.testing import (
    assert_causal,
    assert_close,
    assert_compiled_step_equals_eager,
    assert_padding_ignored,
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
    assert_close(model(x[:, :20]), model(x)[:, :20], 1e-5)  # any length; causal
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


DECODE = [CAUSAL[0], CAUSAL[2]]  # the shared protocol tests decode the tiny preset (2 top buckets)


@pytest.mark.parametrize("kw", [c[1] for c in DECODE], ids=[c[0] for c in DECODE])
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
def test_causal_padding_follows_n_top_buckets():
    """With one null bucket the reference's mask, padded for two, shifts the key masks."""
    model = lm(n_top_buckets=1, n_local_attn_heads=0)
    x = tokens(1, 32, seed=10)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, :5] = False
    assert_padding_ignored(lambda t, m: model.forward_lm(t, mask=m).logits, x, mask, V)


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
    with pytest.raises(TypeError, match="tokens must be an int64 or int32 tensor"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="receives_context"):
        model.run(tokens(1, 8), context=torch.randn(1, 8, 32))
    with pytest.raises(TypeError, match="unknown keyword"):
        SinkhornTransformerLM(num_tokens=V, dim=32, depth=1, max_seq_len=32, bucket_sizes=8)
    fixed = SinkhornTransformerLM(
        num_tokens=V, dim=32, depth=1, max_seq_len=32, bucket_size=8, use_simple_sort_net=True
    )
    padded = torch.cat([tokens(1, 20), tokens(1, 12, seed=1)], dim=1)  # the fixed length, masked
    keep = torch.arange(32)[None] < 20
    assert_close(fixed(tokens(1, 20)), fixed(padded, input_mask=keep)[:, :20], 1e-5)
    with pytest.raises(ValueError, match="causal"):
        lm(causal=False).prefill(tokens(1, 4), context=torch.randn(1, 4, 32))


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


def test_decoding_state_saves_and_loads(tmp_path):
    model = lm(n_top_buckets=2, n_local_attn_heads=1)
    seq = tokens(2, 30, seed=8)
    _, state = model.prefill(seq[:, :17])
    state.save(tmp_path)
    again = State.load(tmp_path)
    assert again.position == 17
    want, _ = model.prefill(seq[:, 17:], state)
    got, _ = model.prefill(seq[:, 17:], again)
    assert torch.equal(got, want)


def _compile_case(build: str) -> SinkhornLM:
    """The bench preset's options, or the reference class with its defaults (causal, bucket
    128), at a small width and depth."""
    if build == "bench":
        from longrange.models.sinkhorn.config import sinkhorn_bench

        return SinkhornLM(sinkhorn_bench().replace(dim=64, depth=1))
    return SinkhornTransformerLM(
        num_tokens=256, dim=64, depth=1, heads=4, max_seq_len=512, causal=True, bucket_size=128
    )


@pytest.mark.parametrize("build", ["bench", "reference-defaults"])
def test_training_step_compiles_whole(build):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break (the
    length is not a bucket multiple: the padding is traced too)."""
    from longrange.testing import assert_compiles_whole

    model = _compile_case(build).train()
    seq = torch.randint(0, 256, (1, 500), generator=torch.Generator().manual_seed(3))

    def loss(tokens):
        return model.forward_lm(tokens).logits.float().logsumexp(-1).mean()

    assert_compiles_whole(loss, seq)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_inductor_compiled_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    model = create_model("sinkhorn", "tiny", depth=1).train()
    seq = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))

    def loss(tokens):
        logits = model.forward_lm(tokens).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    assert_compiled_step_equals_eager(model, loss, seq)


def _assert_same_step(plain, other, x):
    """``other``, given ``plain``'s weights, gives its logits and gradients on tokens x."""
    other.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, other):
        out = model.forward_lm(x).logits
        out.logsumexp(-1).mean().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    assert_close(results[1][0], results[0][0], rtol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        if b is not None:
            assert_close(a, b, rtol=1e-5)


def test_recomputed_attention_gives_the_same_step():
    torch.manual_seed(0)
    plain = create_model("sinkhorn", "tiny").train()
    again = create_model("sinkhorn", "tiny", recompute_attention="always").train()
    _assert_same_step(
        plain, again, torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    )
    assert all(block.f.recompute for block in again.body.layers.blocks)
    assert not any(block.f.recompute for block in plain.body.layers.blocks)


def test_auto_recompute_keeps_the_last_attention_branch(monkeypatch):
    """Above the position limit, "auto" recomputes every attention branch but the last block's
    (whose backward runs first); the step is the plain one."""
    import longrange.models.config as model_config

    monkeypatch.setattr(model_config, "RECOMPUTE_POSITIONS", 64)
    torch.manual_seed(0)
    plain = create_model("sinkhorn", "tiny", recompute_attention="never").train()
    auto = create_model("sinkhorn", "tiny").train()
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    _assert_same_step(plain, auto, x)
    flags = [block.f.recompute for block in auto.body.layers.blocks]
    assert len(flags) > 1 and flags == [True] * (len(flags) - 1) + [False]
    auto.forward_lm(x[:, :20])  # at or below the limit nothing is recomputed
    assert not any(block.f.recompute for block in auto.body.layers.blocks)
    with pytest.raises(ValueError, match="keep_last"):
        auto.body.layers.set_f_recompute(True, keep_last=-1)


def test_recompute_rule():
    config = SinkhornConfig(dim=32, depth=1, heads=4, bucket_size=8, max_seq_len=64)
    assert not config.recompute_for(16384) and config.recompute_for(2 * 16384)
    assert config.replace(recompute_attention="always").recompute_for(1)
    with pytest.raises(ValueError, match="recompute_attention"):
        config.replace(recompute_attention="sometimes")
