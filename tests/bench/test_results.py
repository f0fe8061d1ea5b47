"""Results files and the options of ``longrange bench``: bad input is refused in one line before
any work, and a results file that cannot be read is never written over."""

import json

import pytest

from longrange.bench import generate, report, suites
from longrange.bench.results import merge_results, results_path
from longrange.cli import main


def _rows(path):
    return json.loads(path.read_text())["results"]


@pytest.mark.parametrize(
    "text",
    ['{"suite": "generate", "results": [{"family": "perf', "[1, 2]", '{"results": {"family": "x"}}'],
    ids=["truncated", "a-list", "rows-not-a-list"],
)
def test_a_results_file_that_cannot_be_read_is_refused_not_written_over(tmp_path, text):
    path = tmp_path / "generate.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"generate\.json"):
        merge_results(path, {}, [{"family": "vanilla", "prompt_len": 8, "new_tokens": 2}])
    assert path.read_text() == text


def test_the_cli_refuses_a_corrupt_results_file_before_any_work(tmp_path, capsys, monkeypatch):
    path = results_path(tmp_path, "cpu", "generate")
    path.parent.mkdir(parents=True)
    path.write_text('{"results": [{"family": "performer", "prom')

    def work(*args, **kwargs):
        raise AssertionError("ran before refusing")

    monkeypatch.setattr(generate, "generate_point", work)
    argv = ["bench", "generate", "--out", str(tmp_path), "--device", "cpu", "--prompt-len", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"corrupt results file {path}" in err and err.count("\n") == 1 and "Traceback" not in err
    assert path.read_text() == '{"results": [{"family": "performer", "prom'


@pytest.mark.parametrize(
    "argv, message",
    [
        (["speed", "--models", ","], "--models names no family"),
        (["speed", "--models", "vanilla,vanilla"], "--models names vanilla more than once"),
        (["recall", "--steps", "0"], "--steps must be a positive integer, got 0"),
        (["quality", "--steps", "-3"], "--steps must be a positive integer, got -3"),
        (["speed", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["memory", "--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
        (["generate", "--new-tokens", "0"], "--new-tokens must be a positive integer, got 0"),
        (["generate", "--prompt-len", "0"], "--prompt-len must be a positive integer, got 0"),
        (["memory", "--lengths", "1"], "--lengths must be integers >= 2, got [1]"),
        (["memory", "--lengths", ""], "--lengths must be integers >= 2, got []"),
        (["speed", "--lengths", "256,512,256"], "--lengths names 256 more than once"),
        (["memory", "--lengths", "64,64"], "--lengths names 64 more than once"),
    ],
    ids=[
        "no-family",
        "family-twice",
        "steps-zero",
        "steps-negative",
        "batch-zero",
        "memory-batch",
        "new-tokens",
        "prompt-len",
        "memory-length",
        "memory-no-length",
        "speed-length-twice",
        "memory-length-twice",
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("ran before refusing")

    for name in ("run_speed_suite", "run_memory_suite", "run_generate_suite", "run_recall_suite"):
        monkeypatch.setattr(suites, name, work)
    monkeypatch.setattr(suites, "run_quality_suite", work)
    assert main(["bench", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suite", ["speed", "generate", "knn"])
def test_an_out_that_is_a_file_is_refused_before_any_work(suite, tmp_path, capsys, monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("ran before refusing")

    monkeypatch.setattr(suites, "run_speed_suite", work)
    monkeypatch.setattr(suites, "run_generate_suite", work)
    monkeypatch.setattr("longrange.bench.knn.run_knn_suite", work)
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert main(["bench", suite, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}': {out} is not a folder" in err and err.count("\n") == 1


def test_a_failed_rerun_of_generate_replaces_the_family_row(tmp_path, monkeypatch):
    """A failure used to be recorded without its prompt and new-token counts, so it sat beside
    the family's earlier row instead of replacing it, and the README kept the old figures."""

    def fine(family, *, device, prompt_len, new_tokens, compile):
        speeds = {"prefill_s": 0.1, "incremental_tokens_per_s": 9.0, "recompute_tokens_per_s": 3.0}
        return {
            "family": family,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "speedup": 3.0,
            **speeds,
        }

    def fails(family, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generate, "generate_point", fine)
    suites.run_generate_suite(
        ["vanilla", "performer"], device="cpu", prompt_len=8, new_tokens=2, out_dir=tmp_path
    )
    monkeypatch.setattr(generate, "generate_point", fails)
    suites.run_generate_suite(["vanilla"], device="cpu", prompt_len=8, new_tokens=2, out_dir=tmp_path)
    rows = _rows(results_path(tmp_path, "cpu", "generate"))
    assert [(r["family"], "error" in r) for r in rows] == [("performer", False), ("vanilla", True)]


def test_generate_with_compile_times_compiled_steps_and_the_report_shows_them(tmp_path):
    """``bench generate --compile``: the compiled steps' tokens/s and the compilation's
    seconds beside eager's, in the printed table, the results file and the README table."""
    main_args = ["bench", "generate", "--models", "vanilla", "--prompt-len", "8", "--new-tokens", "4"]
    assert main([*main_args, "--compile", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (row,) = _rows(results_path(tmp_path, "cpu", "generate"))
    assert row["compiled_tokens_per_s"] > 0 and row["compile_s"] >= 0
    assert "compiled tok/s" in generate.format_generate_table([row])
    folder = results_path(tmp_path, "cpu", "generate").parent
    assert "| compiled |" in report.markdown_for_device(folder)
