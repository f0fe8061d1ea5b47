import pytest
import torch

from longrange.bench.listops import SequenceClassifier, listops_batch, train_listops
from longrange.cli import main
from longrange.data.synthetic import evaluate_listops
from longrange.data.tokenizer import ByteTokenizer
from longrange.models.registry import create_model


def test_batches_hold_the_expressions_and_their_values():
    tokens, lengths, labels = listops_batch(6, seed=3, min_length=20, max_length=90, max_depth=4)
    assert tokens.shape[1] % 128 == 0 and tokens.shape[0] == 6
    tok = ByteTokenizer()
    for row, n, label in zip(tokens, lengths, labels):
        text = tok.decode(row[:n])
        assert 20 <= len(text) <= 90 and evaluate_listops(text) == int(label)
        assert (row[n:] == 0).all()


def test_classifier_reads_the_last_real_position_only():
    torch.manual_seed(0)
    clf = SequenceClassifier(create_model("vanilla", "tiny")).eval()
    tokens, lengths, _ = listops_batch(3, seed=1, min_length=20, max_length=60, max_depth=3)
    logits, _ = clf(tokens, lengths)
    assert logits.shape == (3, 10)
    noisy = tokens.clone()
    for i, n in enumerate(lengths):
        noisy[i, n:] = torch.randint(1, 256, (tokens.shape[1] - int(n),))
    torch.testing.assert_close(clf(noisy, lengths)[0], logits)
    changed = tokens.clone()
    changed[0, int(lengths[0]) - 2] = (changed[0, int(lengths[0]) - 2] + 1) % 256
    assert not torch.allclose(clf(changed, lengths)[0][0], logits[0])


def test_classifier_rejects_bad_lengths_and_classes():
    clf = SequenceClassifier(create_model("vanilla", "tiny"))
    with pytest.raises(ValueError, match="lengths must lie"):
        clf(torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(create_model("vanilla", "tiny"), num_classes=1)


@pytest.mark.parametrize("family", ["vanilla", "performer"])
def test_listops_training_runs_and_scores(family):
    row = train_listops(
        family, steps=2, batch_size=4, min_length=20, max_length=100, max_depth=3, eval_batches=2
    )
    assert row["task"] == "listops" and 0.0 <= row["accuracy"] <= 1.0 and row["max_length"] == 100


def test_listops_cli_writes_results(tmp_path, capsys):
    code = main(
        [
            "bench",
            "listops",
            "--models",
            "vanilla",
            "--steps",
            "1",
            "--listops-length",
            "20,80",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0 and list(tmp_path.glob("*/listops.json"))
    assert main(["bench", "listops", "--listops-length", "80", "--out", str(tmp_path)]) == 2
    assert "--listops-length must be MIN,MAX" in capsys.readouterr().err
