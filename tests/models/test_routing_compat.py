"""The routing_transformer names: keyword tables, the encoder-decoder, the wrappers, and
parity with the reference package after converting its weights."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

from longrange.convert import load_reference
from longrange.models.reference_init import init_mismatches
from longrange.models.routing import (
    Autopadder,
    AutoregressiveWrapper,
    RoutingTransformer,
    RoutingTransformerEncDec,
    RoutingTransformerLM,
)
from longrange.ops.routing.kmeans import Kmeans
from longrange.testing import assert_close, import_reference, relative_error


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(num_tokens=64, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8, window_size=8, causal=True)


def _tiny_lm(**kw) -> RoutingTransformerLM:
    return RoutingTransformerLM(**{**TINY, **kw})


def _means(model):
    return [m.means.clone() for m in model.modules() if isinstance(m, Kmeans)]


def _enc_dec(**kw) -> RoutingTransformerEncDec:
    base = dict(
        dim=32, enc_num_tokens=16, enc_depth=1, enc_heads=2, enc_max_seq_len=16, enc_window_size=8,
        dec_num_tokens=16, dec_depth=1, dec_heads=2, dec_max_seq_len=16, dec_window_size=8,
    )  # fmt: skip
    return RoutingTransformerEncDec(**{**base, **kw})


def test_keywords_bind_by_position_in_the_reference_order():
    by_name = RoutingTransformerLM(64, 32, 2, 64, heads=4, dim_head=8, window_size=8, causal=True).config
    by_position = RoutingTransformerLM(64, 32, 2, 64, 4, 8, 8, None, 1, True).config
    assert by_position == by_name and by_name.vocab_size == 64 and by_name.causal
    body = RoutingTransformer(32, 2, 64, 4).config
    assert (body.heads, body.local_attn_window_size, body.kmeans_update_on_backward) == (4, 256, False)
    with pytest.raises(TypeError, match="multiple values for \\['dim'\\]"):
        RoutingTransformerLM(64, 32, 2, 64, dim=32)
    with pytest.raises(TypeError, match="unknown keyword"):
        _tiny_lm(window=8)
    with pytest.raises(TypeError, match="needs the keyword"):
        RoutingTransformerLM(num_tokens=64, dim=32, depth=2)
    with pytest.raises(TypeError, match="ff_activation"):
        _tiny_lm(ff_activation=3)


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
    relu = _tiny_lm(ff_activation=torch.nn.ReLU)
    assert relu.config.ff_activation == "relu"
    assert isinstance(
        _tiny_lm(ff_activation=torch.nn.Hardswish).body.layers.blocks[0].g.fn.fn.act, torch.nn.Hardswish
    )


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
    # with a reversible decoder the values are the reference's: (decoder loss, encoder aux)
    tgt = torch.cat((torch.ones(8, 1, dtype=torch.long), src), dim=1)
    with torch.no_grad():
        loss, aux = model(src, tgt, return_loss=True)
        context, enc_aux = model.enc(src)
        dec_loss = model.dec(tgt, return_loss=True, context=context)
    assert float(enc_aux) > 0 and torch.equal(aux, enc_aux)
    assert abs(float(loss) - float(dec_loss)) < 1e-6


def test_enc_dec_generate_masks_the_context_and_pads_after_eos():
    torch.manual_seed(0)
    model = _enc_dec().eval()
    src = torch.randint(0, 16, (2, 16))
    src_mask = torch.ones(2, 16, dtype=torch.bool)
    src_mask[0, 9:] = False
    start = torch.ones(2, 1, dtype=torch.long)
    out = model.generate(src, start, filter_thres=0.99, enc_input_mask=src_mask)
    assert out.shape == (2, 16)  # default length: the decoder's max_seq_len
    context, _ = model.enc(src, input_mask=src_mask)
    seq = start
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model.dec.net(seq, context=context, context_mask=src_mask)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out[:, :8], seq[:, 1:9])
    eos = int(out[0, 2])
    ended = model.generate(src, start, 6, eos_token=eos, filter_thres=0.99, enc_input_mask=src_mask)
    first = int((ended[0] == eos).nonzero()[0])
    assert (ended[0, first + 1 :] == 0).all()  # pad_value after the row's eos
    with pytest.raises(TypeError, match="enc_ or dec_"):
        model.generate(src, start, 4, beams=2)
    with pytest.raises(TypeError, match="both max_seq_len and seq_len"):
        model.generate(src, start, 4, seq_len=4)
    # the README's spelling of the length
    assert model.generate(src, start, seq_len=3, filter_thres=0.99, enc_input_mask=src_mask).shape == (2, 3)
    with pytest.raises(TypeError, match="not used by generate"):
        model.generate(src, start, 4, dec_input_mask=src_mask)


def test_enc_dec_keywords_are_checked():
    with pytest.raises(TypeError, match="enc_ or dec_"):
        RoutingTransformerEncDec(dim=32, depth=2)
    with pytest.raises(ValueError, match="dim once"):
        _enc_dec(enc_dim=16)
    with pytest.raises(ValueError, match="enc_return_embeddings"):
        _enc_dec(enc_return_embeddings=True)
    with pytest.raises(ValueError, match="dec_causal=False"):
        _enc_dec(dec_causal=False)
    model = _enc_dec(dec_causal=True)
    assert model.enc.config.window_size == model.dec.net.config.window_size == 8
    sides = dict(num_tokens=8, depth=1, heads=2, max_seq_len=256)
    wide = RoutingTransformerEncDec(
        dim=32, **{f"{p}{k}": v for p in ("enc_", "dec_") for k, v in sides.items()}
    )
    assert wide.enc.config.window_size == wide.dec.net.config.window_size == 256
    assert model.dec.ignore_index == model.dec.pad_value == 0


@pytest.mark.parametrize(
    "sides",
    [dict(), dict(enc_shift_tokens=True), dict(dec_shift_tokens=True)],
    ids=["plain", "enc-shift", "dec-shift"],
)
def test_enc_dec_reference_weights_give_the_reference_encoder(sides):
    """Also with token shift on one side only: the reference wraps only that side's branches
    in its shift module, so only that side's names lose the wrapper."""
    rt = import_reference("routing_transformer")
    torch.manual_seed(0)
    kw = dict(dim=32, enc_num_tokens=16, enc_depth=1, enc_heads=2, enc_max_seq_len=32, enc_window_size=8)
    kw.update(dec_num_tokens=16, dec_depth=1, dec_heads=2, dec_max_seq_len=32, dec_window_size=8, **sides)
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
    model = _enc_dec()
    src, tgt = torch.randint(0, 16, (2, 16)), torch.randint(0, 16, (2, 16))
    model(src, tgt, return_loss=True)[0].backward()
    assert model._handle.updates == 1
    before = _means(model)
    model.cancel_kmeans_update()
    model(src, tgt, return_loss=True)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _means(model)))
    assert model.update_kmeans() is None  # the pending step is applied on request
    assert not any(torch.equal(a, b) for a, b in zip(before, _means(model)))


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
    assert wrapper.ignore_index == wrapper.pad_value == 0
    seq = torch.randint(1, 64, (2, 30))
    seq[1, 25:] = 0  # padding is ignored by the loss (ignore_index = pad_value)
    with torch.no_grad():
        logits, aux = lm(seq[:, :-1])
        expected = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], ignore_index=0) + aux
        assert_close(wrapper(seq, return_loss=True), expected, rtol=1e-6)
        assert_close(wrapper([seq[0], seq[1, :25]], return_loss=True), expected, rtol=1e-6)
        assert torch.equal(wrapper(x)[0], lm(x)[0])  # return_loss=False: the net's output
    # top-1 sampling: the argmax of a full recompute, token for token
    sample = wrapper.generate(x[:, :5], 6, filter_thres=0.99)
    with torch.no_grad():
        again = lm(torch.cat((x[:, :5], sample), dim=1))[0][:, 4:-1].argmax(-1)
    assert torch.equal(again, sample)


def test_autopadder_hands_the_padding_mask_over_as_input_mask():
    """The reference's Autopadder always calls the net with ``input_mask``: a module of the
    user's around the LM (or the block stack, which takes no ``mask``) runs padded, and its
    output equals the net's own on the explicitly padded, masked input."""

    class Client(torch.nn.Module):  # a user's module with the reference LM's forward keywords
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x, input_mask=None):
            return self.lm(x, input_mask=input_mask)

    torch.manual_seed(0)
    lm = _tiny_lm(n_local_attn_heads=2).eval()
    body_kw = dict(dim=32, depth=1, max_seq_len=64, heads=2, window_size=8)
    body = RoutingTransformer(**body_kw, n_local_attn_heads=1, local_attn_window_size=8).eval()
    x, h = torch.randint(1, 64, (2, 21)), torch.randn(2, 21, 32)
    mask = F.pad(torch.ones(2, 21, dtype=torch.bool), (0, 3), value=False)
    with torch.no_grad():
        out, aux = Autopadder(Client(lm))(x)
        assert out.shape == (2, 21, 64) and aux.shape == (1,)
        assert torch.equal(out, lm(F.pad(x, (0, 3)), input_mask=mask)[0][:, :21])
        out, _ = Autopadder(body)(h)
        assert torch.equal(out, body(F.pad(h, (0, 0, 0, 3)), input_mask=mask)[0][:, :21])


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
    # product-key memory in the second layer: its sub-keys as wide as the installed
    # product_key_memory's default (128; ours were 256, so the weights did not load)
    pytest.param(dict(pkm_layers=(2,), pkm_num_keys=128), id="pkm"),
]


@pytest.mark.parametrize("options", PARITY)
def test_reference_parity_non_causal(options):
    rt = import_reference("routing_transformer")
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


@pytest.mark.parametrize(
    "theirs",
    [dict(depth=3), dict(receives_context=True), dict(shift_tokens=True)],
    ids=["deeper", "context-layers", "token-shift"],
)
def test_converter_refuses_a_reference_built_with_other_keywords(theirs):
    """Reference weights that have no place in our model are an error, not dropped: a deeper
    stack's extra layers, or context layers (which would land on our self-attention
    blocks), or a token-shifting stack (ours would not shift)."""
    rt = import_reference("routing_transformer")
    kw = dict(num_tokens=16, dim=32, depth=2, max_seq_len=32, heads=2, window_size=8)
    reference = rt.RoutingTransformerLM(**{**kw, **theirs})
    with pytest.raises(ValueError, match="reference weights with no place in RoutingTransformerLM"):
        load_reference(RoutingTransformerLM(**kw), reference.state_dict())


def test_reference_parity_block_stack():
    rt = import_reference("routing_transformer")
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


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # all-local decoder layers
@pytest.mark.parametrize("reversible", [False, True], ids=["plain-decoder", "reversible-decoder"])
def test_enc_dec_loss_pair_gives_the_reference_total_gradient(reversible):
    """``loss.backward(); aux_loss.backward()`` as the reference's README does: the same
    values and the same total gradient as the reference (encoder aux loss counted once).
    The decoder's self attention is local and its routing has one cluster, where our strictly
    causal routing and the reference's balanced routing agree; a large commitment factor (set
    on the reference's k-means: its LM drops the keyword) makes the aux losses count."""
    rt = import_reference("routing_transformer")
    torch.manual_seed(0)
    kw = dict(dim=32, enc_num_tokens=16, enc_depth=1, enc_heads=2, enc_max_seq_len=16, enc_window_size=8)
    kw.update(dec_num_tokens=16, dec_depth=2, dec_heads=2, dec_max_seq_len=16, dec_window_size=16)
    kw.update(dec_n_local_attn_heads=2, dec_reversible=reversible)
    kw.update(enc_commitment_factor=1e3, dec_commitment_factor=1e3)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints a warning
        reference = rt.RoutingTransformerEncDec(**kw)
    for module in reference.modules():
        if type(module).__name__ == "Kmeans":
            module.commitment = 1e3
    src, tgt = torch.randint(0, 16, (2, 16)), torch.randint(0, 16, (2, 17))
    reference(src, tgt, return_loss=True)  # k-means initialised from data
    reference.cancel_kmeans_update()
    ours = RoutingTransformerEncDec(**kw)
    ours.cancel_kmeans_update()
    load_reference(ours, reference.state_dict())
    expected = reference(src, tgt, return_loss=True)
    got = ours(src, tgt, return_loss=True)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.requires_grad
        assert_close(a.detach(), b.detach(), rtol=1e-5)
    # the second value: the encoder's aux loss (reversible decoder) or a zero
    assert (float(got[1].detach().sum()) > 0) == reversible
    for loss in (*expected, *got):
        loss.backward()
    # the reference's gradients under our names: converted like weights
    grads = dict(reference.state_dict())
    grads.update(
        (n, torch.zeros_like(p) if p.grad is None else p.grad) for n, p in reference.named_parameters()
    )
    expected_grads = dict(load_reference(RoutingTransformerEncDec(**kw), grads).named_parameters())
    for name, p in ours.named_parameters():
        got_grad = torch.zeros_like(p) if p.grad is None else p.grad
        assert_close(got_grad, expected_grads[name].detach(), rtol=1e-4, name=name)


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
def test_return_conventions_are_the_reference_s(reversible):
    """Shapes, dtypes and values returned, call by call, against routing_transformer."""
    rt = import_reference("routing_transformer")
    kw = dict(TINY, reversible=reversible)
    torch.manual_seed(0)
    reference = rt.RoutingTransformerLM(**kw)
    ours = RoutingTransformerLM(**kw)
    x = torch.randint(0, 64, (2, 64))

    def described(out):
        if isinstance(out, tuple):
            return tuple(described(t) for t in out)
        return None if out is None else (tuple(out.shape), out.dtype, out.requires_grad)

    for model, wrapper_class in ((reference, rt.AutoregressiveWrapper), (ours, AutoregressiveWrapper)):
        model.returned = [model(x), wrapper_class(model)(x, return_loss=True), model.update_kmeans()]
    assert described(tuple(ours.returned)) == described(tuple(reference.returned))
    assert ours(x)[1].shape == (() if reversible else (1,))
    body_kw = dict(dim=32, depth=1, max_seq_len=64, heads=2, window_size=16, reversible=reversible)
    h = torch.randn(2, 64, 32, requires_grad=True)  # (the reference's reversible stack needs it)
    assert described(RoutingTransformer(**body_kw)(h)) == described(rt.RoutingTransformer(**body_kw)(h))
    wrapper = AutoregressiveWrapper(ours)
    assert wrapper.update_kmeans() is None and _enc_dec().update_kmeans() is None


@pytest.mark.parametrize(
    "options",
    [dict(causal=True, n_local_attn_heads=2), dict(use_rezero=True, num_mem_kv=4, weight_tie=True)],
    ids=["causal-local", "rezero-memory-tied"],
)
def test_initialises_like_the_reference(options):
    """Every parameter group starts with the reference's statistics (routing's layers keep
    PyTorch's defaults and the reference's N(0, 0.02) token embedding)."""
    rt = import_reference("routing_transformer")
    kw = dict(num_tokens=256, dim=256, depth=2, max_seq_len=256, heads=4, window_size=64, **options)
    assert init_mismatches(lambda: RoutingTransformerLM(**kw), lambda: rt.RoutingTransformerLM(**kw)) == []
    body = dict(dim=256, depth=2, max_seq_len=256, heads=4, window_size=64, n_local_attn_heads=2)
    assert init_mismatches(lambda: RoutingTransformer(**body), lambda: rt.RoutingTransformer(**body)) == []
