import json

import pytest

from longrange.cli import main
from longrange.models.registry import create_model


def test_train_generate_eval(tmp_path, text_folder, train_cli, capsys):
    assert train_cli("--set", "depth=1") == 0
    run = tmp_path / "runs" / "cli"
    assert json.loads((run / "config.json").read_text())["depth"] == 1
    out = capsys.readouterr().out
    assert "val bpb before" in out and "val bpb after" in out
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", str(run), "--data", str(text_folder), "--device", "cpu"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    greedy = ["generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*greedy, "--device", "cpu"]) == 0
    eager = capsys.readouterr().out
    assert main([*greedy, "--device", "cpu", "--compile"]) == 0
    assert capsys.readouterr().out == eager


@pytest.mark.parametrize(
    "setting, message",
    [
        ("nonsense=1", "unknown model key 'nonsense'"),
        ("depth=two", "bad value for 'depth'"),
        ("depth", "key=value"),
    ],
    ids=["unknown-key", "bad-value", "no-equals"],
)
def test_bad_set(train_cli, capsys, setting, message):
    assert train_cli("--set", setting) == 2
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


def test_eval_and_generate_change_settings_that_keep_the_weights(tmp_path, text_folder, train_cli, capsys):
    settings = ["--set", "num_retrieved_memories=2", "--set", "max_knn_memories=64"]
    assert train_cli("--model", "memorizing", *settings) == 0
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run and its data, shared by the refusal cases (none of which may change it)."""
    root = tmp_path_factory.mktemp("cli-errors")
    data = root / "corpus"
    data.mkdir()
    for i in range(6):
        (data / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 60)
    (root / "one.jsonl").write_text(json.dumps({"text": "only one document " * 20}) + "\n")
    (root / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (root / "a-file").write_text("not a folder")
    args = ["train", "--preset", "tiny", "--set", "max_seq_len=32", "--data", str(data), "--steps", "3"]
    args += ["--batch-size", "2", "--eval-tokens", "128", "--save-every", "3", "--out", str(root / "runs")]
    assert main([*args, "--name", "run", "--no-progress", "--device", "cpu"]) == 0
    return root


TRAIN = ["train", "--preset", "tiny", "--set", "max_seq_len=32", "--steps", "2", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "{run}", "--temperature", "nan"],
            "--temperature must be a finite number in [0.0, inf), got nan",
        ),
        (
            ["generate", "{run}", "--repetition-penalty", "nan"],
            "--repetition-penalty must be a finite number",
        ),
        (["generate", "{run}", "--top-p", "1.5"], "--top-p must be a finite number in (0.0, 1.0], got 1.5"),
        (["generate", "{run}", "--eos-token", "300"], "--eos-token must be a token id in [0, 256), got 300"),
        (["generate", "{run}", "--device", "tpu"], "--device tpu: not a device longrange runs on"),
        (["eval", "{run}", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
        (["eval", "{run}", "--seq-len", "-5"], "--seq-len must be a positive integer, got -5"),
        (["eval", "{run}", "--seq-len", "64"], "--seq-len 64 exceeds the model's max_seq_len 32"),
        (
            ["eval", "{run}", "--data", "{root}/one.jsonl"],
            "no validation tokens: {root}/one.jsonl holds 1 document",
        ),
        ([*TRAIN, "--data", "{python}", "--device", "cpu"], "looks binary (it holds NUL bytes)"),
        (
            [*TRAIN, "--data", "{root}/bad.jsonl"],
            "{root}/bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)",
        ),
        ([*TRAIN, "--data", "{root}/corpus", "--device", "tpu"], "--device tpu: not a device"),
        (
            [*TRAIN, "--data", "{root}/corpus", "--out", "{root}/a-file"],
            "{root}/a-file is a file, not a folder",
        ),
        ([*TRAIN, "--data", "{root}/corpus", "--eval-tokens", "0"], "eval_tokens must be a positive integer"),
        ([*TRAIN, "--data", "{root}/corpus", "--set", "vocab_size=10"], "vocab_size 10 is too small"),
        ([*TRAIN, "--data", "{root}/one.jsonl"], "no validation tokens: {root}/one.jsonl holds 1 document"),
        (
            ["train", "--resume", "{run}", "--batch-size", "8", "--set", "depth=1"],
            "its own --set, --batch-size",
        ),
        (["train", "--resume", "{run}", "--steps", "1"], "steps 1 is below the run's current step 3"),
        (["train", "--resume", "{root}/nope"], "--resume {root}/nope: no such run folder"),
    ],
    ids=[
        "temperature-nan",
        "repetition-penalty-nan",
        "top-p",
        "eos-token-out-of-vocab",
        "device-tpu",
        "eval-seq-len-0",
        "eval-seq-len-negative",
        "eval-seq-len-too-long",
        "eval-one-document",
        "binary-data-file",
        "jsonl-invalid-utf8",
        "train-device-tpu",
        "out-is-a-file",
        "eval-tokens-0",
        "vocab-too-small",
        "one-document",
        "resume-changes-the-run",
        "resume-steps-below",
        "resume-no-folder",
    ],
)
def test_refusals_are_one_line_before_any_work(trained, capsys, argv, message):
    import sys
    from pathlib import Path

    fill = {"root": trained, "run": trained / "runs" / "run", "python": Path(sys.executable).resolve()}
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    capsys.readouterr()
    argv = [a.format(**fill) for a in argv]
    if argv[0] == "train" and "--resume" not in argv and "--out" not in argv:
        argv += ["--out", str(trained / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"longrange {argv[0]}: error: ")
    assert message.format(**fill) in err
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before  # nothing written


def test_resume_applies_the_options_it_may_change_and_says_so(tmp_path, train_cli, capsys):
    assert train_cli("--save-every", "3") == 0
    run = tmp_path / "runs" / "cli"
    capsys.readouterr()
    assert (
        main(["train", "--resume", str(run), "--steps", "5", "--lr", "0.001", "--set", "max_seq_len=32"]) == 0
    )
    err = capsys.readouterr().err
    assert f"resuming {run} with --steps 5 (was 3), --lr 0.001 (was 0.002)" in err
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 5


def test_cpu_commands_flush_denormals_while_they_run(
    tmp_path, text_folder, train_cli, monkeypatch, capsys, denormal_switch
):
    """train, eval (and generate, bench through the same helper) run with subnormal numbers
    flushed on every thread unless --keep-denormals, and leave the mode as they found it."""
    from longrange.train import evaluate, trainer

    numerics = denormal_switch
    seen = []
    fit = trainer.Trainer._fit

    def watched_fit(self, *args, **kwargs):
        seen.append(("train", numerics.denormals_flushed()))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "_fit", watched_fit)
    assert train_cli() == 0
    assert train_cli("--keep-denormals", "--name", "kept") == 0
    run = tmp_path / "runs" / "cli"
    monkeypatch.setattr(
        evaluate, "evaluate_bpb", lambda *a, **k: seen.append(("eval", numerics.denormals_flushed())) or 1.0
    )
    for extra in ([], ["--keep-denormals"]):
        assert main(["eval", str(run), "--data", str(text_folder), "--device", "cpu", *extra]) == 0
    assert seen == [("train", True), ("train", False), ("eval", True), ("eval", False)]
    assert not numerics.denormals_flushed()
    capsys.readouterr()


def test_where_denormals_cannot_be_flushed_a_command_says_so_and_runs(
    tmp_path, text_folder, monkeypatch, capsys
):
    from longrange.ops import numerics
    from longrange.train import evaluate

    monkeypatch.setattr(numerics, "flush_available", lambda: "no C++ compiler found (g++, c++ or clang++)")
    monkeypatch.setattr(evaluate, "evaluate_bpb", lambda *a, **k: 1.0)
    model = create_model("vanilla", preset="tiny")
    model.save_pretrained(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--data", str(text_folder), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert (
        "longrange eval: subnormal numbers kept (no C++ compiler found" in err and "--keep-denormals" in err
    )
    assert (
        main(["eval", str(tmp_path / "m"), "--data", str(text_folder), "--device", "cpu", "--keep-denormals"])
        == 0
    )
    assert capsys.readouterr().err == ""


def test_generate_stops_the_text_at_the_eos_byte(tmp_path, capsys):
    """generate pads a finished row with the eos byte up to --max-new-tokens, and the command
    printed that padding (e.g. a line of text and then up to 200 newlines)."""
    import torch

    from longrange.data.tokenizer import ByteTokenizer
    from longrange.models.base import LongRangeLM

    torch.manual_seed(0)
    create_model("vanilla", "tiny").save_pretrained(tmp_path / "m")
    model = LongRangeLM.from_pretrained(tmp_path / "m").eval()
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(0)
    new = model.generate(tok.encode("ab"), 24, temperature=0.8, generator=gen).tolist()
    # the first byte, from the third on, that the sample has not emitted before
    end = next(i for i in range(2, len(new)) if new[i] not in new[:i])
    argv = ["generate", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "24", "--device", "cpu"]
    assert main([*argv, "--keep-denormals", "--eos-token", str(new[end])]) == 0
    assert capsys.readouterr().out == tok.decode(b"ab" + bytes(new[: end + 1])) + "\n"


@pytest.mark.parametrize(
    "option, message",
    [
        (["--seed", str(2**70)], "--seed must be an integer in [-2**63, 2**64), got 1180591620717411303424"),
        (["--prompt", ""], "--prompt must hold at least one character"),
    ],
    ids=["seed-too-large", "empty-prompt"],
)
def test_generate_refuses_a_bad_seed_or_prompt_before_loading(tmp_path, capsys, option, message):
    """The seed overflowed in torch ('Overflow when unpacking long long') and the empty prompt
    was refused by the sampler, both after the model had been loaded (here: a missing one)."""
    assert main(["generate", str(tmp_path / "nope"), "--device", "cpu", *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_generate_continues_a_prompt_that_is_not_utf8(tmp_path, capsys):
    """A byte model continues any bytes; a prompt argument that is not UTF-8 (it reaches
    Python as lone surrogates) was refused with the codec's error."""
    create_model("vanilla", "tiny").save_pretrained(tmp_path / "m")
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    argv = ["generate", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("caf\ufffd")


def test_a_run_given_relative_data_resumes_from_another_folder(tmp_path, text_folder, monkeypatch, capsys):
    # The run reads the data it started with wherever the resume runs, even where the same
    # relative name means another folder.
    monkeypatch.chdir(text_folder.parent)
    args = ["train", "--preset", "tiny", "--set", "max_seq_len=32", "--data", text_folder.name]
    args += ["--steps", "3", "--batch-size", "2", "--eval-every", "3", "--eval-tokens", "128"]
    args += ["--out", str(tmp_path / "runs"), "--name", "rel", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    run = tmp_path / "runs" / "rel"
    assert json.loads((run / "train_config.json").read_text())["data"] == str(text_folder)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / text_folder.name).mkdir(parents=True)
    (elsewhere / text_folder.name / "other.txt").write_text("another corpus " * 100)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    assert f"data: {text_folder}: 11 train documents" in capsys.readouterr().out
    # the same relative name given again here names the other folder: a change, refused
    assert main(["train", "--resume", str(run), "--steps", "5", "--data", text_folder.name]) == 2
    assert "with its own --data" in capsys.readouterr().err
