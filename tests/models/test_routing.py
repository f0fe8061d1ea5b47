"""The routing family: strict causality across options, padding, incremental decoding,
k-means update semantics, the enc-dec, reference keywords and parity with routing_transformer."""

from __future__ import annotations

import pytest
import torch

from longrange.convert import load_reference
from longrange.generation import generate
from longrange.models.registry import create_model
from longrange.models.routing import (
    Autopadder,
    AutoregressiveWrapper,
    RoutingConfig,
    RoutingLM,
    RoutingTransformer,
    RoutingTransformerEncDec,
    RoutingTransformerLM,
)
from longrange.ops.routing.kmeans import Kmeans
from longrange.testing import assert_causal, assert_close, assert_padding_ignored, relative_error


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


def _train_step(model, x):
    model.train()
    logits, aux = model(x)
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
    ],
)
def test_incremental_decoding_equals_recompute(options):
    torch.manual_seed(0)
    model = _tiny_lm(**options)
    x = torch.randint(0, 64, (2, 45))
    _train_step(model, x)
    model.eval()
    logits, state = model.prefill(x[:, :17])
    rows = [logits]
    for i in range(17, 45):
        step_logits, state = model.step(x[:, i], state)
        rows.append(step_logits[:, None])
    with torch.no_grad():
        full = model(x)[0]
    assert_close(torch.cat(rows, dim=1), full, rtol=1e-5)
    # greedy generation picks the argmax of a full recompute, token for token
    prompt = x[:, :9]
    new = generate(model, prompt, 12, temperature=0.0)
    seq = torch.cat((prompt, new), dim=1)
    with torch.no_grad():
        again = model(seq)[0][:, 8:-1].argmax(-1)
    assert torch.equal(again, new)


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
    assert model.update_kmeans() == n_kmeans  # the pending step is applied on request


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


def test_enc_dec_learns_copy_and_keeps_encoder_aux_loss():
    torch.manual_seed(0)
    model = RoutingTransformerEncDec(
        dim=64,
        enc_num_tokens=16,
        enc_depth=1,
        enc_heads=4,
        enc_dim_head=16,
        enc_max_seq_len=16,
        enc_window_size=8,
        enc_use_absolute_pos_emb=True,
        dec_num_tokens=16,
        dec_depth=1,
        dec_heads=4,
        dec_dim_head=16,
        dec_max_seq_len=16,
        dec_window_size=8,
        dec_use_absolute_pos_emb=True,
        dec_reversible=True,
    )
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        src = torch.randint(2, 16, (16, 8), generator=gen)
        tgt = torch.cat((torch.ones(16, 1, dtype=torch.long), src), dim=1)
        loss, aux = model(src, tgt, return_loss=True)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert model._handle.updates == 120
    model.eval()
    src = torch.randint(2, 16, (8, 8), generator=gen)
    out = model.generate(src, torch.ones(8, 1, dtype=torch.long), 8, temperature=0.01, filter_thres=0.99)
    assert (out == src).float().mean() > 0.9
    # incremental decoding picks what a full re-run of the decoder picks (greedy: top-1)
    context, _ = model.enc(src)
    seq = torch.ones(8, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model.dec.net(seq, context=context)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(seq[:, 1:], out)
    # the encoder's commitment loss is part of the loss even with a reversible decoder
    tgt = torch.cat((torch.ones(8, 1, dtype=torch.long), src), dim=1)
    with torch.no_grad():
        loss, aux = model(src, tgt, return_loss=True)
        context, enc_aux = model.enc(src)
        dec_loss = model.dec(tgt, return_loss=True, context=context)
    assert float(aux) == 0.0 and float(enc_aux) > 0
    assert abs(float(loss) - float(dec_loss + enc_aux)) < 1e-6


def test_decoder_with_context_is_causal():
    torch.manual_seed(0)
    decoder = _tiny_lm(
        receives_context=True, context_window_size=4, context_shared_qk=True, n_local_attn_heads=1
    )
    context = torch.randn(2, 24, 32)
    context_mask = torch.rand(2, 24) > 0.2
    x = torch.randint(0, 64, (2, 30))
    decoder.train()
    logits, aux = decoder(x, context=context, context_mask=context_mask)
    (logits.mean() + aux).backward()
    decoder.eval()
    assert_causal(lambda t: decoder(t, context=context, context_mask=context_mask)[0], x, 64)


def test_decoder_with_context_decodes_incrementally():
    torch.manual_seed(0)
    decoder = _tiny_lm(receives_context=True, n_local_attn_heads=1, shift_tokens=True)
    context = torch.randn(2, 24, 32)
    context_mask = torch.rand(2, 24) > 0.2
    x = torch.randint(0, 64, (2, 30))
    decoder.train()
    logits, aux = decoder(x, context=context, context_mask=context_mask)
    (logits.mean() + aux).backward()
    decoder.eval()
    logits, state = decoder.prefill(x[:, :11], context=context, context_mask=context_mask)
    rows = [logits]
    for i in range(11, 30):
        step_logits, state = decoder.step(x[:, i], state)
        rows.append(step_logits[:, None])
    with torch.no_grad():
        full = decoder(x, context=context, context_mask=context_mask)[0]
    assert_close(torch.cat(rows, dim=1), full, rtol=1e-5)


def test_enc_dec_reference_weights_give_the_reference_encoder():
    rt = pytest.importorskip("routing_transformer")
    torch.manual_seed(0)
    kw = dict(dim=32, enc_num_tokens=16, enc_depth=1, enc_heads=2, enc_max_seq_len=32, enc_window_size=8)
    kw.update(dec_num_tokens=16, dec_depth=1, dec_heads=2, dec_max_seq_len=32, dec_window_size=8)
    reference = rt.RoutingTransformerEncDec(**kw)
    src = torch.randint(0, 16, (2, 32))
    reference.enc(src)  # k-means initialised from data
    reference.eval()
    ours = RoutingTransformerEncDec(**kw).eval()
    load_reference(ours, reference.state_dict())
    with torch.no_grad():
        assert relative_error(ours.enc(src)[0], reference.enc(src)[0]) < 1e-4


def test_enc_dec_cancel_kmeans_update_removes_the_handle():
    torch.manual_seed(0)
    model = RoutingTransformerEncDec(
        dim=32, enc_num_tokens=16, enc_depth=1, enc_heads=2, enc_max_seq_len=16, enc_window_size=8,
        dec_num_tokens=16, dec_depth=1, dec_heads=2, dec_max_seq_len=16, dec_window_size=8,
    )  # fmt: skip
    src, tgt = torch.randint(0, 16, (2, 16)), torch.randint(0, 16, (2, 16))
    model(src, tgt, return_loss=True)[0].backward()
    before = _means(model)
    model.cancel_kmeans_update()
    model(src, tgt, return_loss=True)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _means(model)))


def test_reference_keywords_are_live():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (1, 32))
    aux = []
    for factor in (1e-4, 1e-2):
        torch.manual_seed(0)
        with torch.no_grad():
            aux.append(float(_tiny_lm(commitment_factor=factor).eval()(x)[1]))
    assert abs(aux[1] / aux[0] - 100) < 1e-3
    wide = _tiny_lm(ff_mult=2).body.layers.blocks[0].g.fn.fn.w1
    assert wide.out_features == 64
    torch.manual_seed(0)
    plain = _tiny_lm().eval()
    torch.manual_seed(0)
    absolute = _tiny_lm(use_absolute_pos_emb=True).eval()
    assert absolute.num_params() == plain.num_params() + 64 * 32
    assert not torch.allclose(plain(x)[0], absolute(x)[0])
    # rel_pos_emb switches the local heads' rotary positions (routing_transformer 1.6.1 always
    # turned them on, whatever the keyword said)
    assert (
        _tiny_lm(n_local_attn_heads=2, rel_pos_emb=False).body.layers.blocks[0].f.fn.local_attn.rel_pos
        is None
    )
    assert _tiny_lm(n_local_attn_heads=2).body.layers.blocks[0].f.fn.local_attn.rel_pos is not None
    moe = _tiny_lm(moe_layers=(1,), moe_loss_coef=1.0).train()
    assert moe(x)[1].item() > 0.5  # the balancing loss (about 1) is in the aux loss


def test_bad_keywords_raise():
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
    with pytest.raises(ValueError, match="context"):
        _tiny_lm(receives_context=True)(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        _tiny_lm()(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="enc_ or dec_"):
        RoutingTransformerEncDec(dim=32, depth=2)


def test_wrappers_and_autopadder():
    torch.manual_seed(0)
    lm = _tiny_lm(n_local_attn_heads=2, causal=True)
    padded = Autopadder(lm)
    assert padded.pad_multiple == 8
    x = torch.randint(1, 64, (2, 21))
    lm.eval()
    with torch.no_grad():
        assert_close(padded(x)[0], lm(x)[0], rtol=1e-5)
    wrapper = AutoregressiveWrapper(lm)
    loss = wrapper(torch.randint(1, 64, (2, 30)), return_loss=True)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert wrapper(x)[0].shape == (2, 21, 64)
    sample = wrapper.generate(x[:, :5], 6)
    assert sample.shape == (2, 6)


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


def test_bf16_forward_has_no_nan():
    torch.manual_seed(0)
    model = _tiny_lm(n_local_attn_heads=2, shift_tokens=True).to(torch.bfloat16).eval()
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0, :20] = False
    logits, aux = model(torch.randint(0, 64, (2, 33)), input_mask=mask)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)


PARITY = [
    pytest.param(dict(), id="routed"),
    pytest.param(dict(n_local_attn_heads=2, num_mem_kv=2), id="local-mem"),
    pytest.param(dict(shared_qk=True, n_local_attn_heads=1, reversible=True), id="shared-reversible"),
    pytest.param(dict(use_scale_norm=True, ff_glu=True, weight_tie=True), id="scalenorm-glu-tied"),
    pytest.param(dict(use_rezero=True, shift_tokens=True, n_local_attn_heads=2), id="rezero-shift"),
    pytest.param(dict(emb_dim=48, tie_embedding=True, n_local_attn_heads=(0, 2)), id="emb-dim-per-layer"),
    pytest.param(
        dict(ff_chunks=2, n_local_attn_heads=2, ff_activation=torch.nn.ReLU),
        id="chunks-relu",
    ),
]


@pytest.mark.parametrize("options", PARITY)
def test_reference_parity_non_causal(options):
    rt = pytest.importorskip("routing_transformer")
    torch.manual_seed(0)
    kw = dict(num_tokens=64, dim=64, depth=2, max_seq_len=128, heads=4, dim_head=16, window_size=32)
    kw.update(causal=False, _register_kmeans_update=False, **options)
    reference = rt.RoutingTransformerLM(**kw)
    x = torch.randint(0, 64, (2, 128))
    reference.train()
    reference(x)  # k-means initialised from data
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("residual_weight"):
                p.uniform_(0.5, 1.0)
    reference.eval()
    ours = RoutingTransformerLM(**kw).eval()
    load_reference(ours, reference.state_dict())
    with torch.no_grad():
        expected, expected_aux = reference(x)
        got, got_aux = ours(x)
    assert relative_error(got, expected) < 1e-4
    assert abs(float(got_aux) - float(expected_aux.sum())) <= 1e-4 * abs(float(expected_aux.sum()))


def test_reference_parity_block_stack():
    rt = pytest.importorskip("routing_transformer")
    torch.manual_seed(0)
    kw = dict(dim=32, depth=2, max_seq_len=64, heads=2, window_size=16, n_local_attn_heads=1)
    reference = rt.RoutingTransformer(local_attn_window_size=16, **kw)
    x = torch.randn(2, 64, 32)
    reference(x)
    reference.eval()
    ours = RoutingTransformer(local_attn_window_size=16, **kw).eval()
    load_reference(ours, reference.state_dict())
    with torch.no_grad():
        assert relative_error(ours(x)[0], reference(x)[0]) < 1e-4
