"""block_recurrent's reference-named classes: ``BlockRecurrentTransformer`` equals
block-recurrent-transformer-pytorch after weight conversion (segment by segment, memories and
states included); its segments equal one call; ``RecurrentTrainerWrapper`` trains across
segments with dropout of memories and states; generation continues a given state."""

from __future__ import annotations

import random

import pytest
import torch

from longrange.convert import load_reference
from longrange.models.block_recurrent import (
    BlockRecurrentLM,
    BlockRecurrentTransformer,
    RecurrentTrainerWrapper,
)
from longrange.models.reference_init import init_mismatches
from longrange.models.registry import create_model
from longrange.testing import assert_close, import_reference

V = 40
ARGS = dict(num_tokens=V, dim=32, depth=2, dim_head=8, heads=2, block_width=8, num_state_vectors=4)


def tokens(batch, n, seed=0):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_reference_named_class_matches_reference():
    ref_pkg = import_reference("block_recurrent_transformer_pytorch")
    torch.manual_seed(0)
    span = dict(depth=3, recurrent_layers=(2, 3), read_recurrent_layers=(1, 3))
    for extra in ({}, dict(use_compressed_mem=True), span):
        args = dict(ARGS, max_seq_len=24, **extra)
        ref = ref_pkg.BlockRecurrentTransformer(**args)
        ours = load_reference(BlockRecurrentTransformer(**args), ref.state_dict())
        mems_a = mems_b = states_a = states_b = []
        for seg in range(3):
            x = tokens(2, 25, seed=seg)
            loss_a, mems_a, states_a = ref(x, return_loss=True, xl_memories=mems_a, states=states_a)
            loss_b, mems_b, states_b = ours(x, return_loss=True, xl_memories=mems_b, states=states_b)
            assert_close(loss_b, loss_a, rtol=1e-5, name=f"loss {extra} segment {seg}")
            for a, b in zip(mems_a + states_a, mems_b + states_b):
                assert_close(b, a, rtol=1e-4)
        logits_a = ref(tokens(2, 24, seed=9), xl_memories=mems_a, states=states_a)[0]
        logits_b = ours(tokens(2, 24, seed=9), xl_memories=mems_b, states=states_b)[0]
        assert_close(logits_b, logits_a, rtol=1e-4)
    # A partial final block: like the reference, it updates the states; unlike it, the memory too.
    x = tokens(2, 13, seed=10)
    _, ref_mems, ref_states = ref(x, return_memories_and_states=True)
    _, our_mems, our_states = ours(x, return_memories_and_states=True)
    for a, b in zip(ref_states, our_states):
        assert_close(b, a, rtol=1e-4)
    native = BlockRecurrentLM.forward_lm(ours, x)
    assert_close(our_mems[0], ours.flush(native.state).layers[0]["xl"])
    assert our_mems[0].shape[-2] == 8 and ref_mems[0].shape[-2] == 8


def test_reference_named_segments_equal_one_call_and_generate():
    torch.manual_seed(0)
    short = BlockRecurrentTransformer(max_seq_len=16, **ARGS).eval()
    long = BlockRecurrentTransformer(max_seq_len=48, **ARGS).eval()
    long.load_state_dict(short.state_dict())
    x = tokens(2, 49, seed=11)
    wrapper = RecurrentTrainerWrapper(short)
    loss, mems, states = wrapper(x, return_memories_and_states=True)
    whole, mems_w, states_w = long(x, return_loss=True, return_memories_and_states=True)
    assert_close(loss, whole, rtol=1e-5)
    for a, b in zip(mems + states, mems_w + states_w):
        assert_close(a, b, rtol=1e-5)

    prime = x[:, :5]
    out = wrapper.generate(prime, 40, temperature=0)
    assert out.shape == (2, 35)
    seq = torch.cat([prime, out], dim=1)
    assert torch.equal(long(seq[:, :-1])[0].argmax(-1)[:, 4:], out)
    new, mems_g, states_g = short.generate(prime, 17, temperature=0, return_memories_and_states=True)
    assert torch.equal(new, out[:, :12])
    _, mems_f, states_f = short(seq[:, :16], return_memories_and_states=True)
    for a, b in zip(mems_g + states_g, mems_f + states_f):
        assert_close(a, b, rtol=1e-5)


def test_trainer_wrapper_dropout_and_mask():
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(
        num_tokens=V, dim=32, depth=2, dim_head=8, heads=2, block_width=8, num_state_vectors=4, max_seq_len=8
    )
    x = tokens(2, 25, seed=12)
    dropped = RecurrentTrainerWrapper(model, xl_memories_dropout=1.0, state_dropout=1.0).train()
    random.seed(0)
    fresh = sum(model(x[:, i * 8 : i * 8 + 9], return_loss=True)[0] for i in range(3)) / 3
    assert_close(dropped(x), fresh, rtol=1e-6)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 3:5] = False
    keep = RecurrentTrainerWrapper(model)
    changed = torch.where(mask, x, (x + 7) % V)
    assert_close(keep(changed, mask=mask), keep(x, mask=mask), rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8 plus 1"):
        keep(x[:, :20])


def test_generate_keeps_the_references_sampling_rule():
    # keep ceil((1 - filter_thres) * V) logits, divide by temperature: with filter_thres 0.99
    # one token is kept (greedy), whatever the temperature.
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(max_seq_len=16, **ARGS).eval()
    prime = tokens(2, 5, seed=3)
    greedy = model.generate(prime, 17, temperature=0)
    assert torch.equal(model.generate(prime, 17, temperature=3.0, filter_thres=0.99), greedy)
    torch.manual_seed(1)
    sampled = model.generate(prime, 17, temperature=1.0, filter_thres=0.5)
    assert sampled.shape == (2, 12) and not torch.equal(sampled, greedy)
    # top ceil(0.5 * 40) = 20 tokens: every sampled token is among the 20 largest logits
    seq = torch.cat([prime, sampled], dim=1)
    logits = model(seq[:, :-1])[0][:, 4:]
    kth = logits.topk(20, dim=-1).values[..., -1]
    assert (logits.gather(-1, sampled[..., None])[..., 0] >= kth).all()


def test_bad_calls():
    compat = BlockRecurrentTransformer(max_seq_len=16, **ARGS)
    with pytest.raises(TypeError, match="unknown keyword"):
        BlockRecurrentTransformer(num_tokens=V, dim=32, depth=2, flash=True)
    with pytest.raises(TypeError, match="num_tokens"):
        BlockRecurrentTransformer(dim=32, depth=2)
    with pytest.raises(ValueError, match="not both"):
        BlockRecurrentTransformer(compat.config, dim=32)
    with pytest.raises(ValueError, match="one memory per layer"):
        compat(tokens(2, 8), xl_memories=[torch.zeros(2, 2, 8, 8)])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        compat(tokens(2, 17))
    with pytest.raises(ValueError, match="filter_thres"):
        compat.generate(tokens(2, 3), 6, filter_thres=1.0)
    torch.manual_seed(0)
    model = create_model("block_recurrent", vocab_size=V, dim=32, depth=2, heads=2, dim_head=8, block_width=8)
    with pytest.raises(ValueError, match="qk_rmsnorm_scale"):
        load_reference(model, compat.state_dict())
    lstm = BlockRecurrentTransformer(max_seq_len=16, gate_type="lstm", **ARGS)
    with pytest.raises(ValueError, match="fixed gate"):
        load_reference(lstm, {})


@pytest.mark.parametrize(
    "options",
    [dict(), dict(depth=3, recurrent_layers=(2, 3), use_compressed_mem=True)],
    ids=["one-recurrent-layer", "two-recurrent-layers-compressed"],
)
def test_initialises_like_the_reference(options):
    """PyTorch's defaults and the reference's own draws for the states; the family's
    ``BlockRecurrentLM`` keeps its GPT-2-style initialisation."""
    ref_pkg = import_reference("block_recurrent_transformer_pytorch")
    kw = dict(num_tokens=256, dim=256, depth=2, dim_head=64, heads=4, max_seq_len=128, block_width=64)
    kw.update(num_state_vectors=32, **options)
    assert (
        init_mismatches(
            lambda: BlockRecurrentTransformer(**kw), lambda: ref_pkg.BlockRecurrentTransformer(**kw)
        )
        == []
    )
    torch.manual_seed(0)
    native = create_model(
        "block_recurrent", vocab_size=256, dim=256, depth=2, heads=4, dim_head=64, block_width=64
    )
    assert abs(float(native.embed.weight.detach().std()) - 0.02) < 1e-3
    assert abs(float(BlockRecurrentTransformer(**kw).embed.weight.detach().std()) - 1.0) < 0.02
