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
