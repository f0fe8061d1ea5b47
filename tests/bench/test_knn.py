import pytest

from longrange.bench import knn


def test_the_points_fill_a_memory_each_time_chunks_in_turn_and_measure_recall(monkeypatch):
    monkeypatch.setattr(knn, "SIZE", {"num_tokens": 256, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16})
    empty, row = knn.ours_points([0, 512], repeats=2)
    assert empty["fill"] == 0 and empty["recall_at_k"] is None and empty["relative_to_empty"] == 1.0
    # below the exact limit the index is the exact search: every neighbour is found
    assert row["fill"] == 512 and row["index"] == "exact" and row["recall_at_k"] == 1.0
    assert row["chunk_s"] > 0 and row["relative_to_empty"] > 0
    assert "recall@32 1.000 (exact)" in knn.format_knn_row(row)


def test_the_reference_point_measures_its_own_index_recall(monkeypatch):
    """The reference's recall is its index's answers against exact search over the entries
    its memory file holds (the reference package is a dev extra: no skip when it is there)."""
    pytest.importorskip("memorizing_transformers_pytorch")
    monkeypatch.setattr(knn, "SIZE", {"num_tokens": 256, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16})
    row = knn.reference_point(1024, repeats=1)
    assert row["fill"] == 1024 and row["reference_chunk_s"] > 0
    assert 0.0 < row["reference_recall_at_k"] <= 1.0
    row = {**row, "k": 32, "chunk_s": 0.1}
    assert f"reference recall@32 {row['reference_recall_at_k']:.3f}" in knn.format_knn_row(row)


def test_bad_fills_are_refused():
    with pytest.raises(ValueError, match="fills"):
        knn.run_knn_suite([-1])


def test_the_suite_times_every_point_of_ours_before_any_of_the_reference(monkeypatch, tmp_path):
    """The reference's memory-file write-back must not land in our timed chunks: all of ours
    run first, in one child; the speed-ups come from the points they name."""
    calls = []

    def child(which, fills, repeats):
        calls.append((which, fills))
        if which == "ours":
            return [
                {"fill": f, "chunk_s": 0.1 * (1 + f / 1000), "relative_to_empty": 1 + f / 1000} for f in fills
            ]
        return [{"fill": fills[0], "reference_chunk_s": 0.4}]

    monkeypatch.setattr(knn, "_in_child", child)
    monkeypatch.setattr("longrange.bench.reference.reference_available", lambda family: True)
    rows = knn.run_knn_suite([1000, 0], repeats=1, compare_reference=True, out_dir=str(tmp_path))
    assert calls == [("ours", [0, 1000]), ("reference", [0]), ("reference", [1000])]
    assert [r["fill"] for r in rows] == [0, 1000]
    assert [r["speedup"] for r in rows] == pytest.approx([4.0, 2.0])


def test_report_lists_the_fills_in_order(tmp_path):
    """The README's kNN table reads fill by fill, smallest first, whatever order the JSON
    holds; failed points are left out."""
    import json

    from longrange.bench.report import markdown_for_device

    rows = [
        {"family": "memorizing", "fill": 250000, "chunk_s": 0.3, "relative_to_empty": 3.0},
        {"family": "memorizing", "fill": 0, "chunk_s": 0.1, "relative_to_empty": 1.0},
        {"family": "memorizing", "fill": 32768, "chunk_s": 0.15, "relative_to_empty": 1.5},
        {"family": "memorizing", "fill": 1000, "error": "ours: failed"},
    ]
    (tmp_path / "knn.json").write_text(json.dumps({"environment": {}, "results": rows, "suite": "knn"}))
    table = markdown_for_device(tmp_path)
    lines = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in lines] == ["| 0", "| 32,768", "| 250,000"]


def test_the_cli_fills_the_documented_defaults_without_lengths(monkeypatch, tmp_path):
    """`bench knn` without --lengths used the speed suite's 1024,4096: no fill 0, so no
    time relative to the empty memory, and never the 250,000 entries the docstring names."""
    from longrange.bench import suites
    from longrange.cli import main

    seen = []
    monkeypatch.setattr(knn, "run_knn_suite", lambda fills, **kwargs: seen.append(("knn", fills)))
    monkeypatch.setattr(
        suites, "run_speed_suite", lambda f, lengths, **kwargs: seen.append(("speed", lengths))
    )
    assert main(["bench", "knn", "--out", str(tmp_path)]) == 0
    assert main(["bench", "speed", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert main(["bench", "knn", "--out", str(tmp_path), "--lengths", "0,512"]) == 0
    assert seen == [("knn", list(knn.DEFAULT_FILLS)), ("speed", [1024, 4096]), ("knn", [0, 512])]
