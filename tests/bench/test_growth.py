import json

import pytest

from longrange.bench import growth
from longrange.bench.report import markdown_for_device
from longrange.bench.results import merge_results
from longrange.bench.timing import steps_in_turn
from longrange.cli import main


def test_steps_take_turns_after_a_warm_up_of_each():
    calls = []
    times = steps_in_turn([lambda: calls.append("a"), lambda: calls.append("b")], repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert [len(t) for t in times] == [2, 2]


def test_lengths_are_timed_in_turn_in_one_process(monkeypatch):
    seen = []
    monkeypatch.setattr(growth, "fwd_bwd", lambda model, tokens: seen.append(tokens.shape[1] - 1))
    rows = growth.growth_point("vanilla", [64, 128], device="cpu", repeats=2)
    assert seen == [64, 128] * 3  # the warm-up round, then two timed rounds
    assert [(r["length"], r["base_length"], r["rounds"]) for r in rows] == [(64, 64, 2), (128, 64, 2)]
    assert rows[0]["vs_base"] == 1.0


def test_the_ratio_pairs_each_round_with_its_own_base_step(monkeypatch):
    # base steps of 1, 2, 3 s; the long ones 2, 8, 6 s at twice the length: the rounds'
    # tokens/s ratios are 1, 0.5, 1 (median 1), where the medians' ratio would read 0.67
    monkeypatch.setattr(growth, "steps_in_turn", lambda steps, repeats, device: [[1, 2, 3], [2, 8, 6]])
    rows = growth.growth_point("vanilla", [32, 64], device="cpu", repeats=3)
    assert rows[1]["vs_base"] == 1.0
    assert rows[1]["vs_base_range"] == [0.5, 1.0]
    assert rows[1]["tokens_per_s"] == 64 / 6
    assert rows[0]["tokens_per_s"] == 32 / 2


def test_a_real_run_writes_growth_json_and_keeps_other_rows(tmp_path, capsys):
    growth.run_growth_suite(["vanilla"], [32, 64], device="cpu", repeats=1, out_dir=str(tmp_path))
    growth.run_growth_suite(["vanilla"], [32, 96], device="cpu", repeats=1, out_dir=str(tmp_path))
    (path,) = tmp_path.glob("*/growth.json")
    rows = json.loads(path.read_text())["results"]
    assert sorted(r["length"] for r in rows) == [32, 64, 96]
    assert all(r["tokens_per_s"] > 0 and r["vs_base"] > 0 and r["cpu_cache"] in ("on", "off") for r in rows)
    assert "vs base" in capsys.readouterr().out


def test_a_family_that_fails_gets_an_error_row_per_length(tmp_path, monkeypatch):
    def fail(family, lengths, *, device, repeats):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(growth, "growth_point", fail)
    rows = growth.run_growth_suite(["vanilla"], [32, 64], device="cpu", repeats=1, out_dir=str(tmp_path))
    assert [(r["length"], r["error"]) for r in rows] == [(32, "out of memory"), (64, "out of memory")]


@pytest.mark.parametrize(
    ("lengths", "repeats", "message"),
    [
        ([64], 1, "lengths must be two or more distinct integers"),
        ([64, 64], 1, "lengths must be two or more distinct integers"),
        ([1, 64], 1, "lengths must be two or more distinct integers"),
        ([32, 64], 0, "repeats must be an int >= 1"),
    ],
)
def test_bad_lengths_and_repeats_are_refused_before_any_work(tmp_path, lengths, repeats, message):
    with pytest.raises(ValueError, match=message):
        growth.run_growth_suite(["vanilla"], lengths, device="cpu", repeats=repeats, out_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_the_cli_turns_one_length_into_one_line(tmp_path, capsys):
    code = main(["bench", "growth", "--lengths", "64", "--out", str(tmp_path), "--no-cpu-cache"])
    err = capsys.readouterr().err
    assert code != 0
    assert "lengths must be two or more distinct integers" in err and "Traceback" not in err


def test_the_report_shows_each_length_against_its_base(tmp_path):
    def row(family, length, tokens_per_s, vs_base):
        return {
            "family": family,
            "length": length,
            "base_length": 16384,
            "tokens_per_s": tokens_per_s,
            "vs_base": vs_base,
        }

    rows = [row("sinkhorn", 16384, 6528, 1.0), {**row("sinkhorn", 65536, 5684, 0.871), "cpu_cache": "on"}]
    rows += [row("performer", 16384, 6105, 1.0), {**row("performer", 65536, 6055, 0.984), "rounds": 5}]
    rows[-1]["vs_base_range"] = [0.9412, 1.0263]
    rows += [row("routing", 16384, 6385, 1.0), {**row("routing", 65536, 0, 0), "error": "out of memory"}]
    merge_results(tmp_path / "dev" / "growth.json", {"device": "dev"}, rows, keys=("family", "length"))
    text = markdown_for_device(tmp_path / "dev")
    assert "| family | 16K tok/s | 64K tok/s (vs 16K) |" in text
    assert "| sinkhorn | 6,528 | 5,684 (0.87) |" in text  # a row from before the range was kept
    assert "| performer | 6,105 | 6,055 (0.98, 0.94-1.03) |" in text
    assert "| routing | 6,385 | fails |" in text
    assert "Lengths timed with the CPU allocation cache: sinkhorn at 64K.\n" in text
