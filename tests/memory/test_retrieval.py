import pytest
import torch
import torch.nn.functional as F

from longrange.memory.knn.retrieval import Retrieved, memory_scores, memory_values, retrieved_attention_naive
from longrange.testing import assert_same_forward_backward

CASES = [pytest.param(1, 4, 7, 5, 16, id="small"), pytest.param(2, 3, 63, 32, 64, id="odd-long")]


@pytest.mark.parametrize("b,h,n,k,d", CASES)
def test_fused_retrieved_attention_equals_gathering_the_pairs(b, h, n, k, d):
    gen = torch.Generator().manual_seed(n)
    rows = 200
    keys = F.normalize(torch.randn(rows, d, generator=gen), dim=-1)
    values = torch.randn(rows, d, generator=gen)
    ids = torch.randint(0, rows, (b, h, n, k), generator=gen)
    found = torch.rand(b, h, n, k, generator=gen) > 0.2
    ids = ids.masked_fill(~found, 0)
    q = F.normalize(torch.randn(b, h, n, d, generator=gen), dim=-1)
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, keys[ids])  # what a search returns
    scale = torch.rand(h, 1, 1, generator=gen) * 10

    def weights(sim):
        return (sim * scale).masked_fill(~found, float("-inf")).softmax(-1).nan_to_num(0.0)

    def fused(q):
        pairs = Retrieved(ids, scores, found, keys, values)
        return memory_values(weights(memory_scores(q, pairs)), pairs)

    def naive(q):
        return retrieved_attention_naive(q, weights, Retrieved(ids, scores, found, keys, values))

    assert_same_forward_backward(fused, naive, [q], rtol=1e-5)


def test_missing_pairs_get_no_weight_and_no_gradient():
    keys, values = torch.randn(4, 8), torch.randn(4, 8)
    ids = torch.tensor([[1, 0]])
    found = torch.tensor([[True, False]])
    pairs = Retrieved(ids, torch.tensor([[0.5, 123.0]]), found, keys, values)
    q = torch.randn(1, 8, requires_grad=True)
    sim = memory_scores(q, pairs).masked_fill(~found, float("-inf"))  # as the attention masks
    assert sim[0, 0] == 0.5
    weights = sim.softmax(-1)
    out = memory_values(weights, pairs)
    torch.testing.assert_close(out, values[1:2])
    (out * torch.randn(1, 8)).sum().backward()
    torch.testing.assert_close(q.grad, torch.zeros(1, 8))  # one pair found: its weight is 1 whatever q


@pytest.mark.parametrize("overwrite", ["wrap-around", "cleared-row-refilled"])
def test_gradients_are_those_of_the_pairs_read_even_after_the_memory_overwrites_them(tmp_path, overwrite):
    from longrange.memory.knn import KNNMemory

    gen = torch.Generator().manual_seed(5)
    memory = KNNMemory(16, max_memories=24, num_indices=2, memmap_filename=tmp_path / "m", backend="exact")
    keys = F.normalize(torch.randn(2, 20, 16, generator=gen), dim=-1)
    memory.add(torch.stack([keys, torch.randn(2, 20, 16, generator=gen)], dim=2))
    q = F.normalize(torch.randn(2, 3, 7, 16, generator=gen), dim=-1)
    ids, scores, found = memory.lookup(q, 5)
    # what the pairs were when they were read
    snapshot = Retrieved(ids, scores, found, memory.key_table().clone(), memory.value_table().clone())
    live = Retrieved(ids, scores, found, memory.key_table(), memory.value_table(), memory.lease(ids))
    cotangent = torch.randn(2, 3, 7, 16, generator=gen)

    def loss(q, pairs):
        weights = (memory_scores(q, pairs) * 8).softmax(-1)
        return (memory_values(weights, pairs) * cotangent).sum()

    q_live, q_snap = q.clone().requires_grad_(), q.clone().requires_grad_()
    out_live, out_snap = loss(q_live, live), loss(q_snap, snapshot)
    if overwrite == "cleared-row-refilled":
        memory.clear([1])
    fresh = torch.randn(2, 30, 2, 16, generator=gen)  # overwrites every slot of both rows
    memory.add(fresh)
    assert not torch.equal(memory.key_table(), snapshot.keys)
    out_live.backward()
    out_snap.backward()
    torch.testing.assert_close(out_live, out_snap)
    torch.testing.assert_close(q_live.grad, q_snap.grad)
    memory.close()
