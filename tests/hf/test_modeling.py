"""The transformers classes of every family: Auto classes, shared weights, forward, loss,
save / load in both directory formats, and what is refused."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")

from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import longrange.hf as lh
from longrange.models.base import LongRangeLM


def fits(model, length: int) -> int:
    """``length``, or the model's max_seq_len when that is shorter (memorizing's chunks of 8)."""
    return min(length, model.config.max_seq_len)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def native_logits(model, seq):
    with torch.no_grad():
        out = model.forward_lm(seq)
        if out.state is not None:
            out.state.close()
        return out.logits


def test_auto_classes_load_an_exported_model(family, saved_lr, tmp_path):
    model, lr_dir = saved_lr(family)
    out = tmp_path / "hf"
    lh.export_hf(lr_dir, out)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == f"longrange_{family}" and config.family == family
    assert config.longrange_config() == model.config
    seq = tokens(2, model.config.max_seq_len)
    expected = native_logits(model, seq)
    for auto in (AutoModelForCausalLM, AutoModel):
        loaded = auto.from_pretrained(out).eval()
        assert type(loaded).__name__ == f"{type(config).__name__.removesuffix('Config')}ForCausalLM"
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=seq).logits, expected)


def test_wrap_shares_the_weights(family, tiny):
    model = tiny(family)
    hf = lh.wrap(model)
    assert hf.longrange is model
    assert {p.data_ptr() for p in hf.parameters()} == {p.data_ptr() for p in model.parameters()}
    seq = tokens(1, 8)
    before = hf(input_ids=seq).logits
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(hf(input_ids=seq).logits, before)


def test_save_pretrained_round_trip_in_both_formats(family, tiny, tmp_path):
    model = tiny(family)
    hf = lh.wrap(model)
    hf.save_pretrained(tmp_path / "hf")
    seq = tokens(2, fits(model, 16))
    expected = native_logits(model, seq)
    with torch.no_grad():
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(input_ids=seq).logits, expected
        )
    # The weights file is longrange's: the same tensor names as LongRangeLM.save_pretrained writes.
    model.save_pretrained(tmp_path / "lr")
    with (
        safe_open(tmp_path / "hf" / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "lr" / "model.safetensors", "pt") as b,
    ):
        names = sorted(a.keys())
        assert names == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)
    # transformers' side reads a longrange directory too.
    with torch.no_grad():
        assert torch.equal(lh.from_pretrained(tmp_path / "lr").eval()(input_ids=seq).logits, expected)
    # import-hf gives longrange back its own directory.
    lh.import_hf(tmp_path / "hf", tmp_path / "back")
    assert torch.equal(native_logits(LongRangeLM.from_pretrained(tmp_path / "back").eval(), seq), expected)


def test_tied_weights_stay_tied_after_loading(tmp_path, tiny):
    model = tiny("vanilla")
    assert model.head.weight is model.embed.weight
    lh.wrap(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).longrange
    assert loaded.head.weight is loaded.embed.weight


def test_config_json_holds_both_halves(tmp_path, tiny):
    model = tiny("vanilla")
    lh.wrap(model).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["family"] == "vanilla" and data["model_type"] == "longrange_vanilla"
    assert {k: data[k] for k in model.config.to_dict()} == json.loads(json.dumps(model.config.to_dict()))
    config = lh.config_class_for("vanilla")(dim=64, heads=2, depth=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 2)
    assert config.max_position_embeddings == config.max_seq_len
    with pytest.raises(ValueError, match="dim"):
        lh.config_class_for("vanilla")(dim=-1)
    with pytest.raises(ValueError, match="family 'performer'"):
        lh.config_class_for("vanilla")(family="performer")
    with pytest.raises(ValueError, match="not a longrange family"):
        lh.directory_family(_write_config(tmp_path / "other", {"model_type": "gpt2"}))


def _write_config(directory, data):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def test_loss_shifts_labels_and_ignores_minus_100(family, tiny):
    model = tiny(family)
    hf = lh.wrap(model)
    seq = tokens(2, fits(model, 12))
    labels = seq.clone()
    labels[0, :5] = -100
    out = hf(input_ids=seq, labels=labels)
    logits = native_logits(model, seq)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()  # a plain call trains
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() >= 2)


def test_attention_mask(family, tiny):
    model = tiny(family)
    hf = lh.wrap(model)
    seq = tokens(2, fits(model, 12))
    with torch.no_grad():
        plain = hf(input_ids=seq).logits
        assert torch.equal(hf(input_ids=seq, attention_mask=torch.ones_like(seq)).logits, plain)
        # Right padding: the kept positions are those of the unpadded rows (causality).
        mask = torch.ones_like(seq)
        mask[1, 7:] = 0
        padded = hf(input_ids=seq, attention_mask=mask).logits
    assert torch.allclose(padded[1, :7], plain[1, :7], atol=1e-5)
    assert torch.allclose(padded[0], plain[0], atol=1e-5)
    with pytest.raises(ValueError, match="padded batch"):
        hf(input_ids=seq, attention_mask=mask, use_cache=True)


def test_left_padding_keeps_the_unpadded_logits(family, tiny):
    # transformers' convention (position ids count kept tokens): a left-padded row reads as the
    # row without its padding, for every family, whatever its positional scheme.
    hf = lh.wrap(tiny(family))
    n = fits(hf.longrange, 10)
    seq = tokens(2, n - 3)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), seq], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        got = hf(input_ids=padded, attention_mask=mask).logits
        assert torch.allclose(got[0, 3:], hf(input_ids=seq[:1]).logits[0], atol=1e-5)
        assert torch.allclose(got[1, 1:], hf(input_ids=padded[1:, 1:]).logits[0], atol=1e-5)


def test_long_inputs_are_refused_or_read_in_segments(family, tiny):
    model = tiny(family)
    limit = model.config.max_seq_len
    seq = tokens(2, 2 * limit + 3)
    with pytest.raises(ValueError, match="segment_long_inputs=True"):
        lh.wrap(model)(input_ids=seq)
    hf = lh.wrap(model, segment_long_inputs=True)
    with torch.no_grad():
        got = hf(input_ids=seq).logits
    # What longrange's evaluation does with a long document: chunks of max_seq_len, the state
    # carried for a family that carries one.
    state = model.init_state(2) if model.carries_state else None
    pieces = []
    with torch.no_grad():
        for start in range(0, seq.shape[1], limit):
            out = model.forward_lm(seq[:, start : start + limit], state=state)
            state = out.state
            pieces.append(out.logits)
    if state is not None:
        state.close()
    assert torch.equal(got, torch.cat(pieces, dim=1))


def test_bad_calls_are_refused(tiny):
    hf = lh.wrap(tiny("vanilla"))
    seq = tokens(1, 6)
    with pytest.raises(ValueError, match="input_ids"):
        hf(inputs_embeds=torch.zeros(1, 6, 64))
    with pytest.raises(ValueError, match="logits only"):
        hf(input_ids=seq, output_hidden_states=True)
    with pytest.raises(TypeError, match="LongRangeCache"):
        hf(input_ids=seq, cache=object())
    with pytest.raises(ValueError, match="labels shape"):
        hf(input_ids=seq, labels=seq[:, :3])
    with pytest.raises(ValueError, match="activation"):
        hf.gradient_checkpointing_enable()
    with pytest.raises(TypeError, match="LongRangeLM"):
        lh.wrap(torch.nn.Linear(2, 2))


def test_loading_in_bfloat16_equals_the_longrange_model_cast(family, saved_lr):
    # from_pretrained(dtype=...) builds under that default dtype: the Performer's orthogonal
    # features (QR) failed to build in bfloat16, and other families computed their buffers
    # (rotary frequencies, ...) in bfloat16 instead of casting longrange's float32 ones.
    model, lr_dir = saved_lr(family)
    loaded = lh.from_pretrained(lr_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    expected = LongRangeLM.from_pretrained(lr_dir).to(torch.bfloat16).eval()
    seq = tokens(2, fits(model, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=seq).logits, native_logits(expected, seq))


def test_the_auxiliary_loss_counts_once_under_gradient_accumulation(tiny):
    # The Trainer passes num_items_in_batch (the targets of all accumulated micro-batches) and
    # sums the micro-batches' losses; the auxiliary loss (here Routing's k-means commitment)
    # was added whole to each, so k micro-batches counted it k times.
    hf = lh.wrap(tiny("routing", commitment_factor=1.0))
    half = tokens(2, 16)
    seq = torch.cat([half, half])  # both halves hold the same aux loss as the whole
    with torch.no_grad():
        aux = hf.longrange.forward_lm(seq).aux_loss
        whole = hf(input_ids=seq, labels=seq).loss
        n = seq[:, 1:].numel()
        parts = [hf(input_ids=p, labels=p, num_items_in_batch=torch.tensor(n)).loss for p in (half, half)]
    assert aux > 0.01
    assert torch.allclose(parts[0] + parts[1], whole, atol=1e-5)
    assert torch.allclose(hf(input_ids=seq, labels=seq, num_items_in_batch=n).loss, whole, atol=1e-6)


def test_token_embeddings_are_found_and_resizing_is_refused(family, tiny):
    # get_input_embeddings was None, so resize_token_embeddings failed with an AttributeError.
    hf = lh.wrap(tiny(family))
    embedding = hf.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding) and embedding.num_embeddings == 256
    assert any(p is embedding.weight for p in hf.longrange.parameters())
    assert hf.resize_token_embeddings() is embedding
    assert hf.resize_token_embeddings(256, pad_to_multiple_of=64) is embedding
    for size, multiple in ((300, None), (256, 100)):
        with pytest.raises(ValueError, match=r"new_num_tokens must be the model's vocab_size \(256\)"):
            hf.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    assert hf.config.vocab_size == 256 and hf.longrange.config.vocab_size == 256


def test_return_dict_false_gives_tuples_from_the_argument_or_the_config(tiny):
    hf = lh.wrap(tiny("vanilla"))
    seq = tokens(1, 6)
    with torch.no_grad():
        logits = hf(input_ids=seq).logits
        loss, got = hf(input_ids=seq, labels=seq, return_dict=False)
        assert loss.dim() == 0
        assert torch.equal(got, logits)
        hf.config.return_dict = False  # transformers' models read the config's setting too
        (got,) = hf(input_ids=seq)
        assert torch.equal(got, logits)
        assert torch.equal(hf(input_ids=seq, return_dict=True).logits, logits)
