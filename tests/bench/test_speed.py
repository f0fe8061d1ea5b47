import json

import pytest

from longrange.bench.speed import format_table, memory_in_fresh_process, run_speed_suite


def test_speed_suite_writes_json(tmp_path, capsys):
    rows = run_speed_suite(["vanilla"], [32, 64], device="cpu", repeats=1, out_dir=tmp_path, memory=False)
    assert [r["length"] for r in rows] == [32, 64]
    files = list(tmp_path.glob("*/speed.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"]
    row = data["results"][0]
    assert {"family", "length", "fwd_bwd_s", "fwd_s", "tokens_per_s", "params"} <= set(row)
    assert row["tokens_per_s"] > 0
    # A second run replaces its own points and keeps the others.
    run_speed_suite(["vanilla"], [64], device="cpu", repeats=1, out_dir=tmp_path, memory=False)
    data = json.loads(files[0].read_text())
    assert sorted(r["length"] for r in data["results"]) == [32, 64]
    assert "vanilla" in capsys.readouterr().out


def test_memory_point_runs_in_a_fresh_process():
    mb = memory_in_fresh_process("vanilla", 256, device="cpu", batch_size=1)
    assert mb is not None and mb > 0


def test_table_shows_errors():
    text = format_table([{"family": "x", "length": 8, "batch_size": 1, "error": "out of memory"}])
    assert "out of memory" in text


def test_table_accepts_rows_without_forward_time():
    row = {"family": "x (reference)", "length": 8, "batch_size": 1, "fwd_bwd_s": 1.0, "fwd_s": None}
    row["tokens_per_s"] = 8.0
    assert "x (reference)" in format_table([row])


@pytest.mark.parametrize(
    "family, length",
    [("performer", 64), ("routing", 256), ("sinkhorn", 256), ("block_recurrent", 512), ("memorizing", 1024)],
)
def test_reference_point_runs_each_reference_package(family, length):
    from longrange.bench.reference import reference_available, time_reference_point

    if not reference_available(family):
        pytest.skip(f"the {family} reference package is not installed")
    row = time_reference_point(family, length, repeats=1)
    assert row["family"] == f"{family} (reference)" and row["length"] == length
    assert row["fwd_bwd_s"] > 0 and row["params"] > 0


def test_reference_in_a_fresh_process_reports_failures():
    from longrange.bench.speed import _reference_point_in_fresh_process

    row = _reference_point_in_fresh_process("no_such_family", 64, 1)
    assert row["family"] == "no_such_family (reference)" and "KeyError" in row["error"]


def test_reference_lengths_restrict_the_reference_pass(tmp_path):
    from longrange.bench.reference import reference_available

    with pytest.raises(ValueError, match="reference_lengths must be integers >= 2"):
        run_speed_suite(["vanilla"], [32], device="cpu", reference_lengths=[1], out_dir=tmp_path)
    if not reference_available("performer"):
        pytest.skip("the performer reference package is not installed")
    rows = run_speed_suite(
        ["performer"],
        [32, 64],
        device="cpu",
        repeats=1,
        out_dir=tmp_path,
        memory=False,
        compare_reference=True,
        reference_lengths=[64],
    )
    assert [(r["family"], r["length"]) for r in rows] == [
        ("performer", 32),
        ("performer", 64),
        ("performer (reference)", 64),
    ]
