"""The routing family: strict causality across options, padding, incremental decoding (with
options and a context beyond the shared protocol tests), k-means update semantics, config
checks, presets and save/load."""

from __future__ import annotations

import copy
import pickle
import typing

import pytest
import torch

from longrange.models.registry import create_model
from longrange.models.routing import ACTIVATIONS, RoutingConfig, RoutingLM, RoutingTransformerLM
from longrange.models.routing.config import Activation
from longrange.models.state import State
from longrange.ops.routing.kmeans import Kmeans
from longrange.testing import (
    assert_causal,
    assert_close,
    assert_compiled_step_equals_eager,
    assert_padding_ignored,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one thread avoids OpenMP barriers on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(num_tokens=64, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8, window_size=8, causal=True)


def _tiny_lm(**kw) -> RoutingTransformerLM:
    return RoutingTransformerLM(**{**TINY, **kw})


def _train_step(model, x, **kwargs):
    model.train()
    logits, aux = model(x, **kwargs)
    (logits.logsumexp(-1).mean() + aux).backward()
    model.zero_grad(set_to_none=True)


CAUSAL_OPTIONS = [
    pytest.param(dict(), id="routed-only-shared-qk"),
    pytest.param(dict(n_local_attn_heads=2), id="local-heads"),
    pytest.param(dict(n_local_attn_heads=(1, 3), local_attn_radius_blocks=2), id="local-per-layer"),
    pytest.param(dict(shared_qk=False, num_mem_kv=2), id="separate-qk-mem2"),
    pytest.param(dict(reversible=True, n_local_attn_heads=1), id="reversible"),
    pytest.param(dict(shift_tokens=True, n_local_attn_heads=1), id="shift-tokens"),
    pytest.param(dict(moe_layers=(1,)), id="moe"),
    pytest.param(dict(pkm_layers=(2,), use_rezero=True), id="pkm-rezero"),
    pytest.param(
        dict(weight_tie=True, use_scale_norm=True, emb_dim=24, tie_embedding=True), id="tied-scalenorm-emb"
    ),
]


@pytest.mark.parametrize("options", CAUSAL_OPTIONS)
def test_lm_is_strictly_causal(options):
    torch.manual_seed(0)
    model = _tiny_lm(**options)
    x = torch.randint(0, 64, (2, 37))
    _train_step(model, x)  # k-means initialised and moved once
    model.eval()

    def logits(tokens):
        torch.manual_seed(1)  # MoE draws its second-expert choices at random, in eval too
        return model(tokens)[0]

    assert_causal(logits, x, 64, positions=[0, 5, 18, 30])


def test_padding_is_ignored_by_shift_local_and_routed_heads():
    torch.manual_seed(0)
    model = _tiny_lm(shift_tokens=True, n_local_attn_heads=2, shared_qk=False).eval()
    x = torch.randint(0, 64, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 10:18] = False
    mask[1, :5] = False
    assert_padding_ignored(lambda t, m: model(t, input_mask=m)[0], x, mask, 64)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(n_local_attn_heads=2, shift_tokens=True), id="local-shift"),
        pytest.param(dict(reversible=True, shared_qk=False, emb_dim=24), id="reversible-projected"),
        pytest.param(dict(use_absolute_pos_emb=True, num_mem_kv=2, use_rezero=True), id="abs-pos-mem-rezero"),
    ],
)
def test_incremental_decoding_equals_recompute(options):
    torch.manual_seed(0)
    model = _tiny_lm(**options)
    x = torch.randint(0, 64, (2, 45))
    _train_step(model, x)
    model.eval()
    logits, state = model.prefill(x[:, :17])
    rows = [logits, model.prefill(x[:, 17:23], state)[0]]
    for i in range(23, 45):
        step_logits, state = model.step(x[:, i], state)
        rows.append(step_logits[:, None])
    with torch.no_grad():
        full = model(x)[0]
    assert_close(torch.cat(rows, dim=1), full, rtol=1e-5)
    assert state.position == 45 and len(state.layers) == 2


def test_decoding_state_saves_and_continues(tmp_path):
    torch.manual_seed(0)
    model = _tiny_lm(n_local_attn_heads=2, shift_tokens=True).eval()
    x = torch.randint(0, 64, (2, 30))
    _, state = model.prefill(x[:, :20])
    state.save(tmp_path)
    again = State.load(tmp_path)
    for t in range(20, 30):
        expected, _ = model.step(x[:, t], state)
        got, _ = model.step(x[:, t], again)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(causal=False, n_local_attn_heads=1), id="non-causal"),
        pytest.param(dict(return_embeddings=True), id="embeddings"),
    ],
)
def test_models_without_incremental_state_re_run_their_window(options):
    torch.manual_seed(0)
    model = _tiny_lm(**options).eval()
    x = torch.randint(0, 64, (2, 12))
    first, state = model.prefill(x[:, :10])
    last, _ = model.step(x[:, 10], state)
    with torch.no_grad():
        assert torch.equal(first, model(x[:, :10])[0])
        assert_close(last, model(x[:, :11])[0][:, -1], rtol=1e-6)
    assert state.layers == [] and torch.equal(state.shared["seen"], x[:, :11])


def _means(model):
    return [m.means.clone() for m in model.modules() if isinstance(m, Kmeans)]


def test_exactly_one_kmeans_update_per_backward_and_none_in_eval(monkeypatch):
    torch.manual_seed(0)
    model = _tiny_lm(reversible=True, n_local_attn_heads=1)
    x = torch.randint(0, 64, (2, 32))
    applied = []
    original = Kmeans.update

    def spy(self, new_means=None):
        applied.append(self._pending_count)
        return original(self, new_means)

    monkeypatch.setattr(Kmeans, "update", spy)
    _train_step(model, x)  # initialises the means from data
    handle = model.body._handle
    n_kmeans = len(_means(model))
    assert handle.updates == 1 and applied == [1] * n_kmeans  # one Lloyd step each, not re-run

    before = _means(model)
    _train_step(model, x)
    assert handle.updates == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, _means(model)))

    before = _means(model)
    model.eval()
    logits, aux = model(x)
    (logits.sum() + aux).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _means(model)))

    model.cancel_kmeans_update()
    _train_step(model, x)
    assert handle.updates == 2 and not handle.active
    assert all(torch.equal(a, b) for a, b in zip(before, _means(model)))
    assert model.body.update_kmeans() == n_kmeans  # the pending step is applied on request


def _repeated_centroids(model) -> float:
    """The largest cosine between two different centroids of one head, over the model."""
    worst = -1.0
    for means in _means(model):
        sims = torch.einsum("hcd,hkd->hck", means, means) - 2 * torch.eye(means.shape[1])
        worst = max(worst, float(sims.amax()))
    return worst


@pytest.mark.parametrize("first", ["eval-one-token", "train-one-token", "generate-short-prompt"])
def test_a_short_first_call_leaves_distinct_centroids_and_decoding_exact(first):
    """A first call on fewer points than clusters (or any eval call) does not initialise the
    k-means: the centroids stay distinct, decoding equals the full forward, and a later
    training call on enough points initialises them as it would have on a fresh model."""
    torch.manual_seed(0)
    model = create_model("routing", "tiny", window_size=8, max_seq_len=64)
    fresh = copy.deepcopy(model)
    one = torch.randint(0, 256, (1, 1))
    if first == "train-one-token":
        model.train().forward_lm(one)
    elif first == "eval-one-token":
        model.eval().forward_lm(one)
    else:
        model.eval().generate(torch.randint(0, 256, (1, 3)), 2)
    assert _repeated_centroids(model) < 0.99
    assert not any(bool(m.initted) for m in model.modules() if isinstance(m, Kmeans))
    model.eval()
    x = torch.randint(0, 256, (1, 16))
    logits, state = model.prefill(x[:, :6])
    rows = [logits]
    for i in range(6, 16):
        step_logits, state = model.step(x[:, i], state)
        rows.append(step_logits[:, None])
    with torch.no_grad():
        assert_close(torch.cat(rows, dim=1), model.forward_lm(x).logits, rtol=1e-5)
    seq = torch.randint(0, 256, (2, 64))
    for m in (model, fresh):
        m.train()
        torch.manual_seed(1)  # the same draws
        m.forward_lm(seq)
    assert all(bool(m.initted) for m in model.modules() if isinstance(m, Kmeans))
    for got, expected in zip(_means(model), _means(fresh)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_updates_its_own_kmeans(how):
    """A copy registers its own update handle: the copied one named the original module and
    its hooks stayed on the original's parameters, so a deep copy trained with fixed
    centroids (and a pickled model failed on the handle's weak reference)."""
    torch.manual_seed(0)
    model = _tiny_lm()
    x = torch.randint(0, 64, (2, 32))
    _train_step(model, x)  # initialises the means from data
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert twin.body._handle is not None and twin.body._handle is not model.body._handle
    before, before_twin = _means(model), _means(twin)
    _train_step(twin, x)
    assert all(torch.equal(a, b) for a, b in zip(before, _means(model)))
    assert all(not torch.equal(a, b) for a, b in zip(before_twin, _means(twin)))
    _train_step(model, x)
    assert all(not torch.equal(a, b) for a, b in zip(before, _means(model)))
    uncopied = _tiny_lm()
    uncopied.cancel_kmeans_update()
    assert pickle.loads(pickle.dumps(uncopied)).body._handle is None


def test_checkpointed_routed_attention_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 50))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = create_model("routing", preset="tiny", checkpoint_routed_attention=flag, attn_dropout=0.1)
        model.cancel_kmeans_update()
        torch.manual_seed(1)
        out = model.forward_lm(x)
        (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-5)


def test_kmeans_means_move_toward_data_and_commitment_falls():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1)
    kmeans = Kmeans(2, 8, 4, ema_decay=0.7, commitment=1.0)

    def batch():
        pick = torch.randint(0, 4, (4, 2, 64), generator=gen)
        return centres[torch.arange(2)[:, None], pick] + 0.15 * torch.randn(4, 2, 64, 8, generator=gen)

    kmeans.means.copy_(torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1))
    kmeans.initted.fill_(True)
    losses = []
    for _ in range(25):
        _, _, loss = kmeans(batch(), update_means=True)
        losses.append(float(loss))
        kmeans.update()
    assert losses[-1] < 0.5 * losses[0]
    assert torch.einsum("hcd,hkd->hck", centres, kmeans.means).amax(-1).min() > 0.9


def _context_decoder(**options):
    torch.manual_seed(0)
    decoder = _tiny_lm(receives_context=True, **options)
    context = torch.randn(2, 24, 32)
    context_mask = torch.rand(2, 24) > 0.2
    x = torch.randint(0, 64, (2, 30))
    _train_step(decoder, x, context=context, context_mask=context_mask)
    return decoder.eval(), x, dict(context=context, context_mask=context_mask)


def test_decoder_with_context_is_causal():
    decoder, x, ctx = _context_decoder(context_window_size=4, context_shared_qk=True, n_local_attn_heads=1)
    assert_causal(lambda t: decoder(t, **ctx)[0], x, 64)


def test_decoder_with_context_decodes_incrementally():
    decoder, x, ctx = _context_decoder(n_local_attn_heads=1, shift_tokens=True)
    logits, state = decoder.prefill(x[:, :11], **ctx)
    assert state.shared["context"] is ctx["context"]
    rows = [logits, decoder.prefill(x[:, 11:15], state)[0]]
    for i in range(15, 30):
        step_logits, state = decoder.step(x[:, i], state)
        rows.append(step_logits[:, None])
    with torch.no_grad():
        full = decoder(x, **ctx)[0]
    assert_close(torch.cat(rows, dim=1), full, rtol=1e-5)


def test_decoding_refuses_a_missing_or_unusable_context():
    decoder, x, ctx = _context_decoder()
    with pytest.raises(ValueError, match="receives_context=True: pass context to prefill"):
        decoder.prefill(x[:, :4])
    with pytest.raises(ValueError, match="receives_context=False"):
        _tiny_lm().prefill(x[:, :4], **ctx)
    with pytest.raises(ValueError, match="causal=True and no MoE"):
        _tiny_lm(receives_context=True, moe_layers=(1,)).prefill(x[:, :4], **ctx)


def test_bad_settings_raise_naming_the_field():
    with pytest.raises(ValueError, match="window_size"):
        _tiny_lm(window_size=7)
    with pytest.raises(ValueError, match="n_local_attn_heads"):
        _tiny_lm(n_local_attn_heads=5)
    with pytest.raises(ValueError, match="n_local_attn_heads"):
        _tiny_lm(n_local_attn_heads=(1, 1, 1))
    with pytest.raises(ValueError, match="weight_tie"):
        _tiny_lm(n_local_attn_heads=(1, 2), weight_tie=True)
    with pytest.raises(ValueError, match="moe_layers"):
        _tiny_lm(moe_layers=(3,))
    with pytest.raises(ValueError, match="moe_num_experts must be an integer >= 2"):
        _tiny_lm(moe_num_experts=1)
    with pytest.raises(ValueError, match="ff_activation"):
        RoutingConfig(ff_activation="swish")
    with pytest.raises(ValueError, match="context"):
        _tiny_lm(receives_context=True)(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        _tiny_lm()(torch.zeros(1, 65, dtype=torch.long))
    # per-layer head counts may come as a list (the reference's users pass lists)
    assert RoutingConfig(depth=2, n_local_attn_heads=[1, 2]).local_heads() == (1, 2)
    assert set(ACTIVATIONS) == set(typing.get_args(Activation))


def test_family_registry_presets_and_save_load(tmp_path):
    for preset in ("tiny", "small", "bench"):
        config = create_model("routing", preset=preset).config
        assert RoutingConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    model = create_model("routing", preset="tiny")
    x = torch.randint(0, 256, (1, 40))
    model.train()
    out = model.forward_lm(x)
    (out.logits.mean() + out.aux_loss).backward()
    model.eval()
    model.save_pretrained(tmp_path)
    again = RoutingLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(again(x), model(x), rtol=1e-6)
    assert bool(again.body.layers.blocks[0].f.fn.global_attn.kmeans.initted)
    # the reference-named class loads the same directory
    reference_named = RoutingTransformerLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(reference_named(x)[0], model(x), rtol=1e-6)


def test_bf16_forward_has_no_nan():
    torch.manual_seed(0)
    model = _tiny_lm(n_local_attn_heads=2, shift_tokens=True).to(torch.bfloat16).eval()
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0, :20] = False
    logits, aux = model(torch.randint(0, 64, (2, 33)), input_mask=mask)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)


def _compile_case(build: str) -> RoutingLM:
    """The bench preset's options, or the reference class with its defaults (the issue's
    comparison: causal, 2 local heads, window 128), at a small width and depth."""
    if build == "bench":
        from longrange.models.routing.config import routing_bench

        return RoutingLM(routing_bench().replace(dim=64, depth=1, max_seq_len=256))
    return RoutingTransformerLM(
        num_tokens=256,
        dim=64,
        depth=1,
        heads=4,
        max_seq_len=256,
        causal=True,
        window_size=128,
        n_local_attn_heads=2,
    )


@pytest.mark.parametrize("build", ["bench", "reference-defaults"])
def test_training_step_compiles_whole(build):
    """torch.compile(fullgraph=True) traces forward and backward of a fresh model (the
    k-means initialisation included) without a graph break."""
    from longrange.testing import assert_compiles_whole

    model = _compile_case(build).train()
    seq = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(3))

    def loss(tokens):
        out = model.forward_lm(tokens)
        return out.logits.float().logsumexp(-1).mean() + out.aux_loss

    assert_compiles_whole(loss, seq)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_inductor_compiled_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    model = create_model("routing", "tiny", depth=1).train()
    model.cancel_kmeans_update()
    seq = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))

    def loss(tokens):
        out = model.forward_lm(tokens)
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss

    assert_compiled_step_equals_eager(model, loss, seq)


def test_recomputed_attention_gives_the_same_step_and_one_kmeans_update():
    """recompute_attention="always" keeps only each attention branch's input and runs the
    branch again in backward: the same loss and gradients, and the k-means takes the
    forward's Lloyd step once (the recomputation adds none)."""
    torch.manual_seed(0)
    plain = RoutingTransformerLM(**TINY, n_local_attn_heads=2, _register_kmeans_update=False)
    again = RoutingTransformerLM(**TINY, n_local_attn_heads=2, _register_kmeans_update=False)
    again.load_state_dict(plain.state_dict())
    again.config.recompute_attention = "always"
    x = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, again):
        model.train()
        torch.manual_seed(2)  # the same k-means initialisation draws
        logits, aux = model(x)
        (logits.logsumexp(-1).mean() + aux).backward()
        pending = [m._pending_count for m in model.modules() if isinstance(m, Kmeans)]
        model.update_kmeans()
        means = [m.means.clone() for m in model.modules() if isinstance(m, Kmeans)]
        results.append((logits, aux, [p.grad for p in model.parameters()], pending, means))
    assert all(block.f.recompute for block in again.body.layers.blocks)
    (l1, a1, g1, p1, m1), (l2, a2, g2, p2, m2) = results
    assert p1 == p2 == [1, 1]
    assert_close(l2, l1, rtol=1e-6)
    assert_close(a2, a1, rtol=1e-6)
    for a, b in zip(g2, g1):
        if b is not None:
            assert_close(a, b, rtol=1e-5)
    for a, b in zip(m2, m1):
        assert_close(a, b, rtol=1e-6)


def test_recomputed_attention_replays_the_first_calls_dropout():
    """The first training call also draws the k-means' first centroids; a recomputed branch
    does not draw them again, so its dropout masks must still be the forward's: the gradients
    equal those of the same call without recomputation."""
    x = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    grads = []
    for rule in ("never", "always"):
        torch.manual_seed(0)
        model = create_model("routing", preset="tiny", attn_dropout=0.2, recompute_attention=rule)
        model.cancel_kmeans_update()
        torch.manual_seed(5)
        out = model.forward_lm(x)
        (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert_close(b, a, rtol=1e-5)


def test_recompute_rule():
    config = RoutingConfig(dim=32, depth=1, heads=4, window_size=8, max_seq_len=64)
    assert config.recompute_attention == "auto"
    assert not config.recompute_for(16384) and config.recompute_for(16385)
    assert config.replace(recompute_attention="always").recompute_for(1)
    assert not config.replace(recompute_attention="never").recompute_for(10**6)
    with pytest.raises(ValueError, match="recompute_attention"):
        config.replace(recompute_attention="sometimes")
