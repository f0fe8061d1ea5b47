"""The protocol every family shares (docs/ARCHITECTURE.md, "Protocol"), checked once for all.

Small windows (block_recurrent blocks of 8, memorizing chunks of 8, sinkhorn buckets and
routing windows of 8) so that short sequences cross several block / chunk / bucket boundaries.
"""

import pytest
import torch

from longrange.models.registry import FAMILIES, create_model
from longrange.models.state import State
from longrange.testing import assert_close, assert_compiles_whole

OPTIONS = {
    "vanilla": {},
    "performer": {"chunk_size": 8, "local_attn_heads": (1,), "local_window_size": 8, "shift_tokens": True},
    "routing": {"window_size": 8, "max_seq_len": 64, "shift_tokens": True},
    "sinkhorn": {"bucket_size": 8, "max_seq_len": 64},
    "block_recurrent": {"block_width": 8, "max_seq_len": 64},
    "memorizing": {"max_seq_len": 8, "xl_max_memories": 4, "num_retrieved_memories": 4},
}


def tiny(family: str):
    torch.manual_seed(0)
    model = create_model(family, "tiny", **OPTIONS[family]).eval()
    with torch.no_grad():
        model.forward_lm(torch.randint(0, 256, (2, 8)))  # lazy initialisation (k-means) happens here
    return model


def full_logits(model, seq):
    with torch.no_grad():
        out = model.forward_lm(seq)
        if out.state is not None:
            out.state.close()
        return out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_full_recompute(family):
    model = tiny(family)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    new = model.generate(prompt, 27, temperature=0)
    seq = prompt
    for _ in range(27):
        nxt = full_logits(model, seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(new, seq[:, 5:])


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_step_continue_a_forward(family):
    model = tiny(family)
    seq = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    whole = full_logits(model, seq)
    first, state = model.prefill(seq[:, :11])
    again, same = model.prefill(seq[:, 11:20], state)
    assert same is state and state.position == 20
    steps = []
    for t in range(20, 30):
        logits, returned = model.step(seq[:, t], state)
        assert returned is state
        steps.append(logits[:, None])
    state.close()
    assert_close(torch.cat([first, again, *steps], dim=1), whole, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_protocol_refuses_bad_calls_before_work(family):
    model = tiny(family)
    logits, state = model.prefill(torch.randint(0, 256, (2, 3)))
    assert isinstance(state, State) and logits.shape == (2, 3, 256)
    with pytest.raises(ValueError, match="batch rows"):
        model.prefill(torch.randint(0, 256, (3, 2)), state)
    with pytest.raises(ValueError, match="one token per row"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)
    with pytest.raises(TypeError, match="State"):
        model.step(torch.zeros(2, dtype=torch.long), {"not": "a state"})
    if not model.conditioning_keys:
        with pytest.raises(ValueError, match="context"):
            model.prefill(torch.randint(0, 256, (1, 3)), context=torch.zeros(1, 2, model.config.dim))
    state.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 0), (0, 16)], ids=["no-positions", "no-rows"])
def test_empty_inputs_are_refused_the_same_way(family, shape):
    model = tiny(family)
    with pytest.raises(ValueError, match="at least one row and one position"):
        model.forward_lm(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one row and one position"):
        model.prefill(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_and_backward_compile_without_graph_breaks(family):
    """Every family's training step traces whole (fullgraph: zero graph breaks)."""
    model = tiny(family).train()
    seq = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))

    def loss(tokens):
        return model.forward_lm(tokens).logits.float().logsumexp(-1).mean()

    assert_compiles_whole(loss, seq)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
