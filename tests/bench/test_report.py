"""``longrange bench report`` on results files and READMEs that are not as the suites left
them: one line naming the file, never a traceback, and nothing rewritten."""

import json

import pytest

from longrange.bench.report import END, START
from longrange.cli import main

SPEED_ROW = {"family": "vanilla", "length": 64, "batch_size": 1, "fwd_bwd_s": 0.5, "tokens_per_s": 128.0}


def _folder(tmp_path):
    folder = tmp_path / "results" / "cpu-test"
    folder.mkdir(parents=True)
    return folder


def _report(tmp_path, readme):
    return main(["bench", "report", "--out", str(tmp_path / "results"), "--readme", str(readme)])


@pytest.mark.parametrize(
    "suite, text, message",
    [
        ("speed", '{"environment": {}, "results": [{"family": "vani', "corrupt results file"),
        ("speed", "[1, 2]", "is not an object with a list of rows under 'results'"),
        ("speed", '{"environment": {}}', "is not an object with a list of rows under 'results'"),
        (
            "speed",
            '{"results": [{"length": 64, "fwd_bwd_s": 1, "tokens_per_s": 2}]}',
            "row 0 has no 'family'",
        ),
        ("speed", '{"results": [{"family": "vanilla", "length": 64}]}', "row 0 has no 'fwd_bwd_s'"),
        ("growth", '{"results": [{"family": "vanilla", "length": 64}]}', "row 0 has no 'base_length'"),
        ("recall", '{"results": [{"family": "vanilla"}]}', "row 0 has no 'task'"),
        ("knn", '{"results": [{"family": "memorizing"}]}', "row 0 has no 'fill'"),
        ("context", '{"results": [{"family": "vanilla"}]}', "row 0 has no 'part'"),
        (
            "context",
            '{"results": [{"part": "position", "family": "vanilla"}]}',
            "cannot be reported: KeyError",
        ),
    ],
    ids=[
        "truncated",
        "a-list",
        "no-rows",
        "no-family",
        "no-time",
        "growth-no-base",
        "recall-no-task",
        "knn-no-fill",
        "context-no-part",
        "context-no-curve",
    ],
)
def test_a_malformed_results_file_fails_the_report_in_one_line(suite, text, message, tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / f"{suite}.json").write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text("# mine\n")
    assert _report(tmp_path, readme) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert readme.read_text() == "# mine\n"


def test_a_value_a_table_cannot_show_names_the_folder(tmp_path, capsys):
    folder = _folder(tmp_path)
    row = {**SPEED_ROW, "fwd_bwd_s": "fast"}
    (folder / "speed.json").write_text(json.dumps({"environment": {"device": "cpu"}, "results": [row]}))
    assert _report(tmp_path, tmp_path / "README.md") == 2
    err = capsys.readouterr().err  # after matplotlib's warning about the text it was given
    assert err.splitlines()[-1].startswith(f"longrange bench: error: results in {folder} cannot be reported")
    assert "Traceback" not in err


def test_a_speed_file_whose_points_all_failed_is_reported(tmp_path):
    """Every point of a first run failing (a length the family refuses) left a speed.json the
    report could not plot: a legend of no series raised from matplotlib."""
    folder = _folder(tmp_path)
    row = {"family": "vanilla", "length": 64, "batch_size": 1, "error": "refused"}
    (folder / "speed.json").write_text(json.dumps({"environment": {"device": "cpu"}, "results": [row]}))
    readme = tmp_path / "README.md"
    assert _report(tmp_path, readme) == 0
    assert "| vanilla | fails |" in readme.read_text()


@pytest.mark.parametrize(
    "text, counts",
    [
        (f"intro\n{END}\nmiddle\n{START}\nmine\n", "1 and 1"),
        (f"intro\n{START}\nhand notes\n", "1 and 0"),
        (f"{START}\na\n{END}\n{START}\nb\n{END}\n", "2 and 2"),
    ],
    ids=["end-before-start", "start-alone", "two-pairs"],
)
def test_readme_markers_that_are_not_one_pair_are_refused(text, counts, tmp_path, capsys):
    """Markers in the wrong order raised an IndexError; a lone start marker had the report
    append a block, and the next report then deleted everything between the two."""
    _folder(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    for _ in range(2):
        assert _report(tmp_path, readme) == 2
        err = capsys.readouterr().err
        assert f"holds {counts}: fix the markers by hand" in err and err.count("\n") == 1
    assert readme.read_text() == text


def test_a_readme_that_is_a_folder_is_refused_before_the_report(tmp_path, capsys):
    (_folder(tmp_path) / "speed.json").write_text(json.dumps({"environment": {}, "results": [SPEED_ROW]}))
    readme = tmp_path / "docs"
    readme.mkdir()
    assert _report(tmp_path, readme) == 2
    assert f"--readme '{readme}' is not a file" in capsys.readouterr().err
    assert not (tmp_path / "results" / "cpu-test" / "speed.png").exists()


@pytest.mark.parametrize(
    "suite, good, failed, line",
    [
        (
            "generate",
            {"family": "vanilla", "prompt_len": 8, "new_tokens": 4, "incremental_tokens_per_s": 90.0,
             "recompute_tokens_per_s": 9.0, "speedup": 10.0},
            {"family": "performer", "prompt_len": 8, "new_tokens": 4, "error": "out of memory"},
            "| performer | fails | fails | fails |",
        ),
        (
            "quality",
            {"family": "vanilla", "preset": "tiny", "steps": 5, "val_bpb": 7.5},
            {"family": "routing", "preset": "tiny", "steps": 5, "error": "refused"},
            "| routing | tiny | 5 | fails |",
        ),
    ],
    ids=["generate", "quality"],
)  # fmt: skip
def test_a_failed_point_stays_in_its_table_as_fails(suite, good, failed, line, tmp_path):
    """A re-run that failed replaces the family's row with an error row; the table dropped
    error rows, so the family vanished from the README instead of showing that it failed."""
    folder = _folder(tmp_path)
    (folder / f"{suite}.json").write_text(json.dumps({"environment": {}, "results": [good, failed]}))
    readme = tmp_path / "README.md"
    assert _report(tmp_path, readme) == 0
    text = readme.read_text()
    assert line in text and f"| {good['family']} |" in text
