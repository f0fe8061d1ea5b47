"""models/performer: strict causality (local heads, token shift, reversible), padding, half
precision, the lean feed-forward, recomputation and backends, feature redraw, save / load,
incremental decoding == recompute with the options the shared protocol tests do not use.
The reference's side is in test_performer_compat.py."""

from __future__ import annotations

import pytest
import torch

from longrange.models.performer import PerformerConfig, PerformerLM, PerformerModel, SelfAttention
from longrange.models.performer.layers import FeedForwardChunks
from longrange.models.registry import create_model, make_config
from longrange.models.state import State
from longrange.modules.feedforward import Chunk, FeedForward
from longrange.testing import (
    assert_causal,
    assert_close,
    assert_compiled_step_equals_eager,
    assert_padding_ignored,
)

VOCAB = 40
SMALL = dict(num_tokens=VOCAB, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16)


def tokens(batch, n, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def lm(**overrides) -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(**{**SMALL, "causal": True, "nb_features": 24, **overrides}).eval()


@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
def test_presets_and_config_round_trip(preset):
    config = make_config("performer", preset)
    assert PerformerConfig.from_dict(config.to_dict()) == config
    if preset != "bench":
        model = create_model("performer", preset).eval()
        assert isinstance(model, PerformerModel) and model.config.causal
        x = tokens(1, 33, vocab=256)
        assert_close(model(x[:, :20]), model(x)[:, :20], 1e-5)


CAUSAL_CASES = [
    ("plain", {}),
    ("local-heads", dict(local_attn_heads=(1, 0), local_window_size=8)),
    ("shift-tokens", dict(shift_tokens=True)),
    (
        "reversible-local-shift",
        dict(reversible=True, local_attn_heads=1, local_window_size=8, shift_tokens=True),
    ),
    ("generalized", dict(generalized_attention=True)),
    ("no-projection", dict(no_projection=True, nb_features=None)),
]


@pytest.mark.parametrize("kw", [c[1] for c in CAUSAL_CASES], ids=[c[0] for c in CAUSAL_CASES])
def test_strictly_causal(kw):
    model = lm(chunk_size=8, **kw)
    assert_causal(model, tokens(2, 45), VOCAB, positions=[0, 7, 20, 43], atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_is_ignored(causal):
    model = lm(causal=causal, shift_tokens=True, local_attn_heads=(1, 0), local_window_size=8)
    x = tokens(2, 30, seed=4)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 21:] = False
    mask[1, 3:9] = False
    assert_padding_ignored(lambda t, m: model(t, mask=m), x, mask, VOCAB)


def test_bfloat16_and_float16_have_no_nan():
    for dtype in (torch.bfloat16, torch.float16):
        model = lm(local_attn_heads=(1, 0), local_window_size=8).to(dtype).train()
        x = tokens(2, 37)
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[1, :12] = False
        logits = model(x, mask=mask)
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        logits.float().logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


DECODE_CASES = [
    (
        "local-shift-reversible",
        dict(local_attn_heads=(1, 2), local_window_size=8, shift_tokens=True, reversible=True),
    ),
    ("scalenorm-axial", dict(use_scalenorm=True, rotary_position_emb=False, axial_position_emb=True)),
    (
        "rezero-absolute-generalized",
        dict(use_rezero=True, rotary_position_emb=False, generalized_attention=True),
    ),
]


@pytest.mark.parametrize("kw", [c[1] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_incremental_decoding_equals_recompute(kw):
    model = lm(chunk_size=8, **kw)
    prompt = tokens(2, 13, seed=5)
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    for i in range(20):
        nxt = model(seq)[:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, i]), f"token {i} differs"
        seq = torch.cat((seq, nxt[:, None]), dim=1)
    # running sums: prefill in two pieces equals one prefill
    logits, state = model.prefill(seq[:, :20])
    more, state = model.prefill(seq[:, 20:30], state)
    assert_close(torch.cat((logits, more), 1), model(seq[:, :30]), 1e-5)


@pytest.mark.parametrize("glu,bias", [(False, True), (True, False)], ids=["gelu-bias", "geglu-nobias"])
def test_lean_feedforward_equals_the_plain_layer(glu, bias):
    torch.manual_seed(0)
    ff = FeedForward(16, mult=2, glu=glu, bias=bias)
    lean, plain = FeedForwardChunks(3, ff), Chunk(1, ff, along_dim=1)

    def run(module):
        x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = module(x)
        grads = torch.autograd.grad(out, [x, *ff.parameters()], torch.ones_like(out))
        return out, grads

    out, grads = run(lean)
    want, want_grads = run(plain)
    assert_close(out, want, 1e-6)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, 1e-5)


def test_recomputed_attention_and_backends_give_the_same_gradients():
    x = tokens(2, 30)

    def grads(**kw):
        model = lm(chunk_size=8, local_attn_heads=(1, 0), local_window_size=8, **kw).train()
        model(x).square().mean().backward()
        return [p.grad for p in model.parameters()]

    base = grads()
    for kw in (dict(recompute_attention=True), dict(attn_backend="chunk"), dict(attn_backend="naive")):
        for got, want in zip(grads(**kw), base):
            assert_close(got, want, 1e-4)


def test_feature_redraw_schedule_counted_in_state_dict():
    model = lm(feature_redraw_interval=3)
    proj = model.performer.fast_attentions()[0].projection_matrix
    first = proj.clone()
    model.eval()
    for _ in range(5):
        model(tokens(1, 8))
    assert torch.equal(proj, first), "features must never be redrawn in eval"
    model.train()
    seen = []
    for _ in range(7):
        model(tokens(1, 8))
        seen.append(proj.clone())
    # each matrix serves exactly 3 training calls
    assert torch.equal(seen[2], first) and not torch.equal(seen[3], first)
    assert torch.equal(seen[3], seen[5]) and not torch.equal(seen[6], seen[5])
    assert int(model.state_dict()["performer.calls_since_last_redraw"]) == 1
    twin = lm(feature_redraw_interval=3)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin.performer.fast_attentions()[0].projection_matrix, proj)
    model.fix_projection_matrices_()
    fixed = proj.clone()
    for _ in range(5):
        model(tokens(1, 8))
    assert torch.equal(proj, fixed)


def test_manual_redraw_check():
    model = lm(feature_redraw_interval=1, auto_check_redraw=False).train()
    proj = model.performer.fast_attentions()[0].projection_matrix
    first = proj.clone()
    model(tokens(1, 8))
    model(tokens(1, 8))
    assert torch.equal(proj, first)
    model.check_redraw_projections()  # the reference's method (broken there) works here
    model.check_redraw_projections()
    assert not torch.equal(proj, first)


def test_standalone_attention_redraws_on_its_own_interval():
    attn = SelfAttention(
        32, causal=True, heads=2, dim_head=16, nb_features=8, feature_redraw_interval=2
    ).train()
    proj = attn.fast_attention.projection_matrix
    first = proj.clone()
    x = torch.randn(1, 6, 32)
    attn(x)
    attn(x)
    assert torch.equal(proj, first)
    attn(x)
    assert not torch.equal(proj, first)


def test_save_and_load_keep_projection_matrices(tmp_path):
    model = create_model("performer", "tiny", feature_redraw_interval=None)
    model.redraw_projections()
    model.save_pretrained(tmp_path)
    loaded = PerformerModel.from_pretrained(tmp_path)
    x = tokens(1, 17, vocab=256)
    assert_close(loaded(x), model(x), 1e-6)


def test_decoding_state_saves_and_loads(tmp_path):
    model = lm(chunk_size=8, local_attn_heads=(1, 0), local_window_size=8, shift_tokens=True)
    seq = tokens(2, 30, seed=8)
    _, state = model.prefill(seq[:, :17])
    state.save(tmp_path)
    again = State.load(tmp_path)
    assert again.position == 17
    want, _ = model.prefill(seq[:, 17:], state)
    got, _ = model.prefill(seq[:, 17:], again)
    assert torch.equal(got, want)


def _compile_cases():
    bench = make_config("performer", "bench", dim=32, depth=2, heads=2, dim_head=16, max_seq_len=256)
    defaults = PerformerLM(
        num_tokens=256, max_seq_len=256, dim=32, depth=2, heads=2, dim_head=16, causal=True
    )
    noncausal = PerformerLM(num_tokens=256, max_seq_len=256, dim=32, depth=2, heads=2, dim_head=16)
    return {
        "bench": PerformerModel(bench),
        "reference-defaults": defaults,
        "reference-defaults-noncausal": noncausal,
        "small": create_model("performer", "small"),
    }


@pytest.mark.parametrize("case", ["bench", "reference-defaults", "reference-defaults-noncausal", "small"])
def test_training_step_compiles_without_graph_breaks(case):
    """fullgraph tracing of forward and backward: the bench preset's options (recomputed
    attention, chunked lean feed-forward, a length that pads the last chunk), the reference
    defaults (causal, and the package's own non-causal), and local heads with token shift."""
    from longrange.testing import assert_compiles_whole

    model = _compile_cases()[case].train()
    seq = tokens(2, 101, vocab=256)

    def loss(x):
        logits = model.forward_lm(x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    torch.manual_seed(0)
    eager = loss(seq)
    assert_close(assert_compiles_whole(loss, seq).detach(), eager.detach(), 1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compiled_forward_leaves_the_redraw_count_to_before_compiled_step():
    import torch._dynamo

    model = lm(feature_redraw_interval=2).train()
    proj = model.performer.fast_attentions()[0].projection_matrix
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_lm, backend="aot_eager", fullgraph=True)
    seen = []
    for _ in range(5):
        model.before_compiled_step()
        compiled(tokens(1, 8))
        seen.append(proj.clone())
    # as in eager: each matrix serves exactly 2 training calls
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[2], seen[1])
    assert torch.equal(seen[2], seen[3]) and not torch.equal(seen[4], seen[3])
    assert int(model.performer.calls_since_last_redraw) == 1


@pytest.mark.parametrize("chunks", [1, 3])
def test_feedforward_branch_hands_its_norm_to_the_lean_layer(chunks):
    """The branch passes its LayerNorm into the lean feed-forward (which forms the normalised
    input again in backward); values and gradients equal the norm applied in front."""
    from longrange.modules.branch import Branch

    torch.manual_seed(0)
    branch = Branch(16, FeedForwardChunks(chunks, FeedForward(16, mult=2)))
    x = torch.randn(2, 13, 16, requires_grad=True)
    out = branch(x)
    grads = torch.autograd.grad(out, [x, *branch.parameters()], torch.ones_like(out))
    want = branch.fn.fn(branch.norm(x))
    want_grads = torch.autograd.grad(want, [x, *branch.parameters()], torch.ones_like(want))
    assert_close(out, want, 1e-6)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, 1e-5)


@pytest.mark.slow
def test_inductor_compiled_training_step_equals_eager():
    """A real torch.compile (inductor: generated code) of the reference defaults."""
    model = _compile_cases()["reference-defaults"].train()
    seq = tokens(2, 65, vocab=256)

    def loss(seq):
        logits = model.forward_lm(seq[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())

    assert_compiled_step_equals_eager(model, loss, seq)


def test_the_chunk_size_default_is_the_fused_ops():
    """The config (which imports no torch) writes out the FAVOR+ chunk default; it must stay
    the op's CHUNK_SIZE, as FastAttention's does."""
    import inspect

    from longrange.models.performer.fast_attention import FastAttention
    from longrange.ops.favor import CHUNK_SIZE

    assert PerformerConfig().chunk_size == CHUNK_SIZE
    assert inspect.signature(FastAttention).parameters["chunk_size"].default == CHUNK_SIZE
