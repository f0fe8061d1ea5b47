import json

import pytest

from longrange.cli import main
from longrange.models.registry import create_model


def _train(tmp_path, text_folder, *extra):
    args = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_seq_len=32",
        "--data",
        str(text_folder),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "3",
        "--eval-tokens",
        "128",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "cli",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]
    return main(args)


def test_train_generate_eval(tmp_path, text_folder, capsys):
    assert _train(tmp_path, text_folder, "--set", "depth=1") == 0
    run = tmp_path / "runs" / "cli"
    assert json.loads((run / "config.json").read_text())["depth"] == 1
    out = capsys.readouterr().out
    assert "val bpb before" in out and "val bpb after" in out
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", str(run), "--data", str(text_folder), "--device", "cpu"]) == 0
    assert "bits per byte" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("nonsense=1", "unknown model key 'nonsense'"),
        ("depth=two", "bad value for 'depth'"),
        ("depth", "key=value"),
    ],
    ids=["unknown-key", "bad-value", "no-equals"],
)
def test_bad_set(tmp_path, text_folder, capsys, setting, message):
    assert _train(tmp_path, text_folder, "--set", setting) == 2
    assert message in capsys.readouterr().err


def test_missing_run_folder(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--device", "cpu"]) == 2


def test_corrupt_checkpoint(tmp_path, capsys):
    model = create_model("vanilla", "tiny")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage" * 10)
    assert main(["generate", str(tmp_path / "m"), "--device", "cpu"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_unknown_model(tmp_path, capsys):
    assert main(["train", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model family" in capsys.readouterr().err


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "tiny" in out


def test_help_documents_every_train_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--preset",
        "--data",
        "--seq-len",
        "--batch-size",
        "--steps",
        "--lr",
        "--device",
        "--precision",
        "--out",
        "--resume",
        "--seed",
        "--set",
    ):
        assert option in text


def test_eval_and_generate_change_settings_that_keep_the_weights(tmp_path, text_folder, capsys):
    settings = ["--set", "num_retrieved_memories=2", "--set", "max_knn_memories=64"]
    assert _train(tmp_path, text_folder, "--model", "memorizing", *settings) == 0
    run = tmp_path / "runs" / "cli"
    capsys.readouterr()

    def bpb(*extra):
        assert main(["eval", str(run), "--data", str(text_folder), "--device", "cpu", *extra]) == 0
        return float(capsys.readouterr().out.split("validation bits per byte:")[1].split()[0])

    carried, off = bpb(), bpb("--set", "num_retrieved_memories=0")
    assert carried != off  # retrieval switched off at evaluation changes the result
    assert (
        main(["generate", str(run), "--max-new-tokens", "5", "--device", "cpu", "--set", "xl_max_memories=4"])
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--set", "depth=3"]) == 2
    assert "change the saved weights' layout" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu", "--set", "nonsense=1"]) == 2
    assert "unknown model key 'nonsense'" in capsys.readouterr().err
