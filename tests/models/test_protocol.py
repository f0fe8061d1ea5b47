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
    model = create_model(family, "tiny", **OPTIONS[family])
    with torch.no_grad():  # lazy initialisation: routing's k-means start from a training call
        out = model.forward_lm(torch.randint(0, 256, (2, 8)))
    if out.state is not None:
        out.state.close()
    return model.eval()


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
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32])
def test_tokens_of_a_type_no_embedding_reads_are_refused_before_work(family, dtype):
    """int64 and int32 ids are read; uint8 / int16 (byte data, say) used to pass the check and
    then fail inside the embedding with torch's message."""
    model = tiny(family)
    tokens = torch.randint(0, 200, (2, 6)).to(dtype)
    with pytest.raises(TypeError, match=f"tokens must be an int64 or int32 tensor, got dtype {dtype}"):
        model.forward_lm(tokens)
    assert torch.equal(model.forward_lm(tokens.int()).logits, model.forward_lm(tokens.long()).logits)


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


# the families' tiny models, and the Performer's other attention ops (non-causal fused, the
# generalized kernel on the chunked form)
BF16_CASES = [(family, {}) for family in FAMILIES] + [
    ("performer", {"causal": False}),
    ("performer", {"generalized_attention": True}),
]


@pytest.mark.parametrize(
    "family, extra", BF16_CASES, ids=[f"{f}{'-' + '-'.join(e) if e else ''}" for f, e in BF16_CASES]
)
def test_a_training_step_under_bfloat16_autocast(family, extra):
    """The trainer's --precision bf16 (its default on CUDA): forward under autocast, backward
    after it. Every parameter that gets a gradient in float32 gets a finite one, the loss stays
    within bfloat16's rounding of float32's, and the gradient points the same way. (The
    Performer's FAVOR+ ops and block_recurrent's QK norm failed here with mixed dtypes.)"""
    torch.manual_seed(0)
    model = create_model(family, "tiny", **{**OPTIONS[family], **extra}).train()
    seq = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(4))
    losses, grads = {}, {}
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.forward_lm(seq[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), seq[:, 1:].flatten())
        if out.state is not None:
            out.state.close()
        loss.backward()
        losses[autocast] = loss.item()
        grads[autocast] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[False]
    assert all(torch.isfinite(g).all() for g in grads[True].values())
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    flat = {k: torch.cat([g.flatten().float() for g in v.values()]) for k, v in grads.items()}
    assert torch.nn.functional.cosine_similarity(flat[True], flat[False], dim=0) > 0.9
