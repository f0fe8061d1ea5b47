"""memorizing under torch.compile: a training step that continues a state holding kNN
memories compiles whole (the memory's host work runs as opaque custom operators) with eager's
loss, gradients and memory contents; a call given no state compiles with its own tensor
memories and matches eager; inductor's loss equals eager's."""

import pytest
import torch

from longrange.memory.knn import KNNMemory
from longrange.memory.knn.scratch import ScratchMemory
from longrange.models.memorizing import MemorizingLM
from longrange.models.memorizing.compat import MemorizingTransformer
from longrange.models.memorizing.config import memorizing_bench
from longrange.testing import assert_close, assert_compiles_whole

V, EOS = 64, 5
BUILD = {
    # the bench preset's options (default kNN memory: index chosen by size, faiss on CPU)
    "bench-options": lambda: MemorizingLM(
        memorizing_bench().replace(
            vocab_size=V, dim=32, heads=2, depth=2, max_seq_len=16, max_knn_memories=256
        )
    ),
    # the reference-named class with the reference's defaults (sizes aside) plus document
    # starts at an eos, an XL window and token shift
    "reference-defaults": lambda: MemorizingTransformer(
        num_tokens=V,
        dim=32,
        depth=2,
        max_seq_len=16,
        max_knn_memories=256,
        clear_memories_on_eos_token_id=EOS,
        xl_max_memories=8,
        shift_tokens=True,
    ),
}


def _tokens(n, seed):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", list(BUILD))
def test_training_step_with_kNN_memories_compiles_without_graph_breaks(build):
    torch.manual_seed(0)
    model = BUILD[build]().train()
    x = _tokens(40, seed=1)
    x[1, 21] = EOS  # a document starts in row 1: its memory is cleared at the commit

    def run(compiled: bool):
        state = model.init_state(2)
        with torch.no_grad():
            model.forward_lm(_tokens(40, seed=2), state=state)  # a memory to search
        state = model.detach_state(state)

        def loss(x):
            return model.forward_lm(x, state=state).logits.float().logsumexp(-1).mean()

        model.zero_grad(set_to_none=True)
        if compiled:
            value = assert_compiles_whole(loss, x)
        else:
            value = loss(x)
            value.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        memory = state.shared["knn"][0]
        contents = (memory.db_offsets.tolist(), memory.key_table().clone())
        state.close()
        return value, grads, contents

    (want, want_grads, want_memory), (got, got_grads, got_memory) = run(False), run(True)
    assert_close(got, want, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 10
    for name, grad in got_grads.items():
        assert_close(grad, want_grads[name], rtol=1e-4, name=name)
    assert got_memory[0] == want_memory[0] and torch.equal(got_memory[1], want_memory[1])


def test_a_fresh_memory_reuses_the_compiled_graph():
    """The memory's handle reaches the graph as a tensor input: a sequence through a new
    state (new kNN memories) runs the graphs the first one compiled (one for a state's first
    chunk, one for the next) instead of compiling again."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = BUILD["bench-options"]().train()
    counter = CompileCounter()
    step = torch.compile(model.forward_lm, backend=counter)
    compiled = []
    for seed in (1, 2, 3):
        state = model.init_state(2)
        for start in range(0, 48, 16):
            with torch.no_grad():
                step(_tokens(48, seed)[:, start : start + 16], state=state)
        compiled.append(counter.frame_count)
        state.close()
    assert compiled[0] >= 1 and compiled[1:] == [compiled[0]] * 2, compiled


def test_a_call_without_state_compiles_with_tensor_memories_and_matches_eager():
    torch.manual_seed(0)
    model = BUILD["bench-options"]().eval()
    x = _tokens(50, seed=3)  # four chunks: the last three search the call's own memory

    def loss(x):
        return model.forward_lm(x).logits.float().logsumexp(-1).mean()

    with torch.no_grad():
        want = loss(x)
    assert_close(assert_compiles_whole(loss, x), want, rtol=1e-5)


def test_tensor_memory_searches_like_the_exact_memory(tmp_path):
    gen = torch.Generator().manual_seed(4)
    exact = KNNMemory(8, max_memories=64, num_indices=2, memmap_filename=tmp_path / "m", backend="exact")
    scratch = ScratchMemory(2, 8, 64, torch.zeros(1))
    for step in range(3):
        pairs = torch.nn.functional.normalize(torch.randn(2, 10, 2, 8, generator=gen), dim=-1)
        mask = torch.rand(2, 10, generator=gen) < 0.8
        exact.add(pairs, mask)
        scratch.add(pairs, mask)
        if step == 1:
            exact.clear([0])
            scratch.clear(torch.tensor([True, False]))
        queries = torch.randn(2, 3, 8, generator=gen)
        ids_e, scores_e, found_e = exact.lookup(queries, 12)
        ids_s, scores_s, found_s = scratch.lookup(queries, 12)
        assert torch.equal(found_e, found_s)
        assert_close(scores_s[found_s], scores_e[found_e], rtol=1e-6)
        assert torch.equal(scratch.key_table()[ids_s][found_s], exact.key_table()[ids_e][found_e])
    exact.close()


@pytest.mark.slow
def test_inductor_compiled_training_loss_equals_eager():
    torch.manual_seed(0)
    model = BUILD["bench-options"]().train()
    x = _tokens(33, seed=5)

    def loss(x):
        logits = model.forward_lm(x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:])

    want = loss(x)
    torch._dynamo.reset()
    assert_close(torch.compile(loss, fullgraph=True)(x), want, rtol=1e-5)
