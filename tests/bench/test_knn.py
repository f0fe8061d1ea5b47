import pytest

from longrange.bench import knn


def test_a_point_fills_the_memory_times_a_chunk_and_measures_recall(monkeypatch):
    monkeypatch.setattr(knn, "SIZE", {"num_tokens": 256, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16})
    row = knn.ours_point(512, repeats=1)
    # below the exact limit the index is the exact search: every neighbour is found
    assert row["fill"] == 512 and row["index"] == "exact" and row["recall_at_k"] == 1.0
    assert row["chunk_s"] > 0
    assert "recall@32 1.000 (exact)" in knn.format_knn_row(row)


def test_bad_fills_are_refused():
    with pytest.raises(ValueError, match="fills"):
        knn.run_knn_suite([-1])
