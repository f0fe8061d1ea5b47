"""Decoding states beyond the shared protocol tests: a state saved in the middle of decoding
and loaded again continues exactly, for every family."""

import contextlib
import re

import pytest
import torch

from longrange.models.registry import FAMILIES, create_model
from longrange.testing import assert_close

OPTIONS = {
    "vanilla": {"max_seq_len": 32},
    "performer": {"chunk_size": 8, "local_attn_heads": (1,), "local_window_size": 8, "shift_tokens": True},
    "routing": {"window_size": 8, "max_seq_len": 32, "shift_tokens": True},
    "sinkhorn": {"bucket_size": 8, "max_seq_len": 32},
    "block_recurrent": {"block_width": 8, "max_seq_len": 32},
    "memorizing": {"max_seq_len": 8, "xl_max_memories": 4, "num_retrieved_memories": 4},
}


def tiny(family: str, **options):
    torch.manual_seed(0)
    model = create_model(family, "tiny", **{**OPTIONS[family], **options})
    with torch.no_grad():  # routing's k-means start from the first call in training mode
        out = model.forward_lm(torch.randint(0, 256, (2, 16)))
    if out.state is not None:
        out.state.close()
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoding_state_saved_and_loaded_continues_exactly(family, tmp_path):
    """vanilla's KV cache was not a registered state entry: save_state raised TypeError."""
    model = tiny(family)
    seq = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    _, state = model.prefill(seq[:, :11])
    model.save_state(state, tmp_path / "state")
    loaded = model.load_state(tmp_path / "state", batch_size=2)
    assert loaded.position == 11
    logits = {}
    for name, st in (("kept", state), ("loaded", loaded)):
        steps = [model.step(seq[:, t], st)[0] for t in range(11, 21)]
        st.close()
        logits[name] = torch.stack(steps, dim=1)
    assert_close(logits["loaded"], logits["kept"], 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_under_bf16_autocast_follows_the_full_forward(family):
    """Decoding under autocast, as a bf16 run samples: the step's queries come out of the
    projections in bfloat16 while the caches keep the model's float32. dense_attention's
    argument check refused that mix (vanilla and sinkhorn raised TypeError); the step's
    logits follow the full forward's under the same autocast. Routing's are only checked to
    be finite: bfloat16 rounding may send a token to another cluster in the two paths (a
    discontinuous choice), which moves its logits by far more than rounding."""
    model = tiny(family)
    seq = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model.forward_lm(seq).logits.float()
        logits, state = model.prefill(seq[:, :12])
        steps = [logits[:, -1]] + [model.step(seq[:, t], state)[0] for t in range(12, 19)]
    state.close()
    decoded = torch.stack(steps, dim=1).float()
    assert decoded.shape == full[:, 11:19].shape and torch.isfinite(decoded).all()
    if family != "routing":
        assert_close(decoded, full[:, 11:19], 0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": float("nan")}, "temperature must be a number >= 0 (0 = greedy), got nan"),
        ({"length": 10.0}, "length must be an integer (prime included), got 10.0"),
    ],
    ids=["nan-temperature", "float-length"],
)
def test_block_recurrent_generate_refuses_bad_sampling_arguments_naming_them(kwargs, message):
    """A NaN temperature failed inside torch.multinomial, a float length in range(), both
    after work had started (the compat class and the trainer wrapper alike)."""
    from longrange.models.block_recurrent import BlockRecurrentTransformer, RecurrentTrainerWrapper

    model = BlockRecurrentTransformer(num_tokens=40, dim=32, depth=1, dim_head=8, heads=2, block_width=8)
    prime = torch.randint(0, 40, (2, 3))
    for sampler in (model, RecurrentTrainerWrapper(model)):
        with pytest.raises(ValueError, match=re.escape(message)):
            sampler.generate(prime, **{"length": 8, **kwargs})


# --- compiled decoding --------------------------------------------------------------------
# Graphs a compiled run of STEPS steps builds (one-layer models of OPTIONS, as measured with
# torch 2.13): the first step's (its sizes constants), the next step's (the sizes that changed,
# the caches' lengths, as symbols), and the graphs for positions where a bucket, block, window
# or chunk begins or ends (memorizing's repeat until its XL window has filled). A graph fixed
# to one cache length would need one per step, and hit dynamo's limit.
STEPS = 26
MOST_GRAPHS = {
    "vanilla": 2, "performer": 6, "routing": 6, "sinkhorn": 11, "block_recurrent": 11, "memorizing": 11
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decoding_traces_whole_steps_and_equals_eager(family):
    """Under ``compiled_decoding`` every step traces without a graph break and the graphs
    follow the growing caches (dynamic shapes) over buckets, blocks and chunks: a few graphs
    in all, not one per step, and the same logits as the eager steps. Hashing a symbolic
    length (a dict of biases or rotary tables keyed by it, a set of lengths), an integer
    index into a cache, ``divmod`` and ``math.isfinite`` on a symbol each broke this."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny(family, depth=1)  # (one layer: tracing costs seconds a layer)
    seq = torch.randint(0, 256, (2, 3 + STEPS), generator=torch.Generator().manual_seed(3))
    logits = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        _, state = model.prefill(seq[:, :3])
        with model.compiled_decoding("eager") if compiled else contextlib.nullcontext():
            steps = [model.step(seq[:, t], state)[0] for t in range(3, 3 + STEPS)]
        state.close()
        logits[compiled] = torch.stack(steps, dim=1)
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not breaks, breaks
    assert 1 <= graphs <= MOST_GRAPHS[family], graphs
    assert_close(logits[True], logits[False], 1e-5)


def test_generate_with_compile_gives_eager_tokens():
    """generate(compile=True) runs inductor's code for the steps: greedy tokens as eager."""
    import torch._dynamo

    model = tiny("vanilla")
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    try:
        fast = model.generate(prompt, 12, temperature=0.0, compile=True)
    finally:
        torch._dynamo.reset()
    assert torch.equal(fast, model.generate(prompt, 12, temperature=0.0))
    assert model._decoding_compiled is None  # the block ended with the call


def test_generate_refuses_a_bad_compile_argument():
    model = tiny("vanilla")
    with pytest.raises(TypeError, match=re.escape("compile must be True or False, got 'yes'")):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, compile="yes")
    with pytest.raises(TypeError, match=re.escape("backend must be a torch.compile backend name, got 3")):
        model.compiled_decoding(3).__enter__()
