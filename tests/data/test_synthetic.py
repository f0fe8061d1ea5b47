import numpy as np
import pytest
import torch

from longrange.data import synthetic
from longrange.data.samplers import IGNORE_INDEX


def test_mqar_answers_are_the_values_of_their_keys():
    inputs, targets = synthetic.mqar(3, num_pairs=10, num_queries=6, seed=4)
    assert inputs.shape == targets.shape == (3, 2 * 10 + 3 * 6)
    for b in range(3):
        row = inputs[b].tolist()
        table = dict(zip(row[0:20:2], row[1:20:2]))
        assert len(table) == 10  # distinct keys
        scored = (targets[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(scored) == 6
        for pos in scored:
            assert row[pos - 1] == synthetic.QUERY_MARK
            assert targets[b, pos].item() == table[row[pos]]
            assert row[pos + 1] == table[row[pos]]


def test_mqar_is_seeded():
    assert torch.equal(synthetic.mqar(2, num_pairs=4, seed=1)[0], synthetic.mqar(2, num_pairs=4, seed=1)[0])
    assert not torch.equal(
        synthetic.mqar(2, num_pairs=4, seed=1)[0], synthetic.mqar(2, num_pairs=4, seed=2)[0]
    )


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0], ids=["start", "middle", "end"])
def test_passkey_answer_is_the_hidden_key(depth):
    inputs, targets = synthetic.passkey(2, length=300, depth=depth, seed=3)
    assert inputs.shape == (2, 299)
    for b in range(2):
        text = bytes(inputs[b].tolist()) + bytes([targets[b, -1].item()])
        key = bytes(t for t in targets[b].tolist() if t != IGNORE_INDEX)
        assert len(key) == 5 and key.isdigit()
        assert f"The pass key is {key.decode()}. Remember it.".encode() in text
        needle = b" The pass key is " + key + b". Remember it. "
        question = b" What is the pass key? The pass key is "
        filler = len(text) - len(needle) - len(question) - len(key)
        assert text.index(needle) == round(depth * filler)


def test_copying_targets_repeat_the_source():
    inputs, targets = synthetic.copying(2, length=10, seed=0)
    full = torch.cat([inputs, targets[:, -1:]], dim=1)
    assert torch.equal(full[:, :10], full[:, 11:])
    assert (full[:, 10] == ord("|")).all()
    assert (targets[:, :9] == IGNORE_INDEX).all() and (targets[:, 10:] != IGNORE_INDEX).all()


def test_listops_labels_match_an_independent_evaluator():
    examples = synthetic.listops(8, min_length=100, max_length=600, max_depth=6, seed=2)
    for ex in examples:
        assert 100 <= len(ex.text) <= 600
        assert ex.label == synthetic.evaluate_listops(ex.text)
        assert 0 <= ex.label <= 9
    assert synthetic.evaluate_listops("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]") == 5
    assert synthetic.evaluate_listops("[SM 7 8 [MAX 1 9 ] ]") == 4


def test_answer_accuracy_counts_only_scored_positions():
    logits = torch.full((1, 3, 4), -1.0)
    logits[0, 0, 2] = 1.0
    logits[0, 2, 1] = 1.0
    targets = torch.tensor([[2, IGNORE_INDEX, 3]])
    assert synthetic.answer_accuracy(logits, targets) == 0.5
    with pytest.raises(ValueError, match="no scored"):
        synthetic.answer_accuracy(logits, torch.full((1, 3), IGNORE_INDEX))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_pairs"):
        synthetic.mqar(1, num_pairs=0)
    with pytest.raises(ValueError, match="depth"):
        synthetic.passkey(1, length=300, depth=2)
    with pytest.raises(ValueError, match="too short"):
        synthetic.passkey(1, length=20, depth=0.5)
    assert np.isfinite(1.0)


@pytest.mark.parametrize("distance", [59, 256, 1024, 4096], ids=["shortest", "256", "1K", "4K"])
def test_passkey_answers_lie_exactly_at_the_distance(distance):
    inputs, targets = synthetic.passkey_at_distance(3, distance=distance, prefix=7, seed=distance)
    assert inputs.shape == (3, 7 + len(synthetic.PASSKEY_NEEDLE) + distance + 4)
    for b in range(3):
        seq = [*inputs[b].tolist(), targets[b, -1].item()]
        text = bytes(seq)
        source = text.index(synthetic.PASSKEY_NEEDLE) + len(synthetic.PASSKEY_NEEDLE)
        scored = (targets[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(scored) == synthetic.PASSKEY_DIGITS
        for j, t in enumerate(scored):
            answer = t + 1  # target t is the token at sequence position t + 1
            assert seq[answer] == targets[b, t].item() == seq[source + j]
            assert chr(seq[answer]).isdigit()
            assert answer - (source + j) == distance
        assert text.count(synthetic.PASSKEY_NEEDLE) == 2  # the needle and the question only


@pytest.mark.parametrize("distance", [50, 256, 1024, 16384], ids=["shortest", "256", "1K", "16K"])
def test_recall_answers_lie_exactly_at_the_distance(distance):
    inputs, targets = synthetic.recall_at_distance(
        2, distance=distance, num_pairs=16, num_queries=8, prefix=5, seed=distance
    )
    assert inputs.shape == (2, 5 + distance - 1 + 3 * 16)
    lo, hi = synthetic.KEY_RANGE
    for b in range(2):
        seq = [*inputs[b].tolist(), targets[b, -1].item()]
        scored = (targets[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(scored) == 8
        keys_seen = [i for i, tok in enumerate(seq) if lo <= tok < hi]
        assert len(keys_seen) == 16 + 8  # each pair's key once, each query's key once
        for t in scored:
            key, value, answer = seq[t], targets[b, t].item(), t + 1
            assert seq[t - 1] == synthetic.QUERY_MARK and seq[answer] == value
            earlier = [i for i in keys_seen if i < t and seq[i] == key]
            assert len(earlier) == 1  # the key's pair, found by content
            source = earlier[0] + 1
            assert seq[source] == value
            assert answer - source == distance and t - earlier[0] == distance
        # the pairs that are not asked lie at other distances from the queries
        assert len({seq[i] for i in keys_seen}) == 16


def test_distance_tasks_are_seeded_and_refuse_bad_arguments():
    a = synthetic.recall_at_distance(2, distance=100, seed=3)
    assert torch.equal(a[0], synthetic.recall_at_distance(2, distance=100, seed=3)[0])
    assert not torch.equal(a[0], synthetic.recall_at_distance(2, distance=100, seed=4)[0])
    p = synthetic.passkey_at_distance(2, distance=100, seed=3)
    assert torch.equal(p[0], synthetic.passkey_at_distance(2, distance=100, seed=3)[0])
    with pytest.raises(ValueError, match="distance must be an integer >= 59"):
        synthetic.passkey_at_distance(1, distance=58)
    with pytest.raises(ValueError, match="prefix"):
        synthetic.passkey_at_distance(1, distance=100, prefix=-1)
    with pytest.raises(ValueError, match=r"distance must be an integer >= 3 \* num_pairs \+ 2 = 50"):
        synthetic.recall_at_distance(1, distance=49, num_pairs=16)
    with pytest.raises(ValueError, match="num_queries"):
        synthetic.recall_at_distance(1, distance=100, num_pairs=4, num_queries=5)


@pytest.mark.parametrize("alphabet", [0, 160, 300], ids=["empty", "past-255", "far-past-255"])
def test_copying_refuses_an_alphabet_that_leaves_the_bytes(alphabet):
    with pytest.raises(ValueError, match=r"alphabet must be an integer in \[1, 159\]"):
        synthetic.copying(2, length=3, alphabet=alphabet)
    inputs, targets = synthetic.copying(2, length=50, alphabet=159, seed=1)
    assert int(inputs.max()) <= 255 and int(targets.max()) <= 255


def test_listops_refuses_a_length_window_it_can_never_fill():
    # depth 1 with two arguments makes "[MIN 1 2 ]" and the like: 9 or 10 characters
    assert synthetic.listops_length_range(max_depth=1, max_args=2) == (9, 10)
    with pytest.raises(ValueError, match="9 to 10 characters long; min_length 1900"):
        synthetic.listops(1, min_length=1900, max_length=2000, max_depth=1, max_args=2)
    with pytest.raises(ValueError, match="max_args must be an integer >= 2"):
        synthetic.listops(1, min_length=1, max_length=100, max_args=1)
    lengths = {
        len(ex.text) for ex in synthetic.listops(20, min_length=10, max_length=10, max_depth=1, max_args=2)
    }
    assert lengths == {10}


@pytest.mark.parametrize("batch", [0, -2, 2.0, True], ids=["zero", "negative", "float", "bool"])
@pytest.mark.parametrize(
    "task, options",
    [
        (synthetic.mqar, {"num_pairs": 4}),
        (synthetic.passkey, {"length": 200, "depth": 0.5}),
        (synthetic.copying, {"length": 5}),
        (synthetic.passkey_at_distance, {"distance": 80}),
        (synthetic.recall_at_distance, {"distance": 80}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_batch_that_is_not_a_positive_integer_is_refused_naming_it(task, options, batch):
    # numpy's own errors ("negative dimensions are not allowed", "need at least one array to
    # stack") named neither the argument nor what it takes; a zero batch gave empty tensors
    # from some tasks and failed in others
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        task(batch, **options)
    assert task(np.int64(2), **options)[0].shape[0] == 2
