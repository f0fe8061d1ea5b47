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
