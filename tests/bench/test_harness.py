import json

import pytest
import torch

from longrange.bench.flops import count_flops, growth_exponents
from longrange.bench.report import series_styles, write_report
from longrange.bench.suites import run_suite
from longrange.bench.tasks import train_on_task
from longrange.models.registry import create_model


def test_flop_count_of_a_known_case():
    # One vanilla forward at length n: per layer q/k/v/out projections 8·n·d², the feed-forward
    # 16·n·d² (mult 4), causal attention 4·d over the n(n+1)/2 pairs it needs; plus the head
    # 2·n·d·V.
    model = create_model("vanilla", "tiny")
    c = model.config
    n, d = 64, c.dim
    tokens = torch.randint(0, 256, (1, n))
    with torch.no_grad():
        flops = count_flops(lambda: model(tokens))
    pairs = n * (n + 1) // 2
    expected = c.depth * (8 * n * d * d + 16 * n * d * d + 4 * pairs * d) + 2 * n * d * c.vocab_size
    assert flops == expected


def test_backward_flops_are_twice_forward():
    q = torch.randn(1, 2, 32, 16, requires_grad=True)
    fwd = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    both = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    assert fwd == 4 * 2 * 32 * 32 * 16
    assert both == 3 * fwd
    causal = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert causal == 4 * 2 * (32 * 33 // 2) * 16


def test_growth_exponent():
    assert growth_exponents([1, 2, 4], [1.0, 4.0, 16.0]) == [None, 2.0, 2.0]


def test_speed_json_schema_and_report(tmp_path):
    run_suite(
        "speed",
        ["vanilla"],
        [32, 64],
        device="cpu",
        options={"repeats": 1, "out": tmp_path, "no_memory": True},
    )
    (path,) = tmp_path.glob("*/speed.json")
    data = json.loads(path.read_text())
    assert data["suite"] == "speed"
    assert {"device", "torch", "longrange", "matmul_peak_gflops"} <= set(data["environment"])
    for row in data["results"]:
        assert {
            "family",
            "length",
            "batch_size",
            "fwd_bwd_s",
            "fwd_s",
            "tokens_per_s",
            "fwd_bwd_flops",
            "mfu",
            "matmul_peak_gflops",
        } <= set(row)
        assert 0 < row["mfu"] < 1.5
    assert data["results"][1]["growth"] is not None
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    write_report(tmp_path, readme)
    text = readme.read_text()
    assert "old" not in text and "| vanilla |" in text and text.endswith("tail\n")
    assert "tok/s" in text and "n^" in text  # the throughput / MFU / growth table
    assert (path.parent / "speed.png").is_file()


def test_generate_and_recall_suites_at_tiny_size(tmp_path):
    rows = run_suite(
        "generate",
        ["vanilla"],
        [],
        device="cpu",
        options={"out": tmp_path, "prompt_len": 16, "new_tokens": 8},
    )
    assert rows[0]["incremental_tokens_per_s"] > 0
    readme = tmp_path / "README.md"
    write_report(tmp_path, readme)
    assert "8 new tokens after a 16-token prompt" in readme.read_text()
    row = train_on_task("vanilla", "copying", steps=2, batch_size=2, eval_batches=1)
    assert 0 <= row["accuracy"] <= 1 and row["length"] % 128 == 0


def test_recall_table_in_the_report(tmp_path):
    from longrange.bench.report import markdown_for_device
    from longrange.bench.results import merge_results

    folder = tmp_path / "dev"
    rows = [
        {"family": "vanilla", "task": "copying", "length": 128, "steps": 3, "accuracy": 0.5},
        {"family": "vanilla", "task": "passkey", "length": 256, "steps": 3, "error": "boom"},
    ]
    merge_results(folder / "recall.json", {"device": "dev"}, rows, keys=("family", "task"))
    text = markdown_for_device(folder)
    assert "after 3 training steps" in text
    assert "| family | copying (128 tokens) | passkey (256 tokens) |" in text
    assert "| vanilla | 50.0% | - |" in text


def test_the_report_names_the_points_timed_with_the_cpu_cache(tmp_path):
    from longrange.bench.report import markdown_for_device
    from longrange.bench.results import merge_results

    def row(family, length, cache=None):
        out = {"family": family, "length": length, "batch_size": 1, "fwd_bwd_s": 1.0, "tokens_per_s": 1.0}
        return out if cache is None else {**out, "cpu_cache": cache}

    folder = tmp_path / "dev"
    rows = [row("sinkhorn", 512), row("sinkhorn", 65536, "on"), row("sinkhorn", 16384, "on")]
    rows += [row("routing", 16384, "off"), row("routing", 131072, "on")]
    rows += [{**row("routing", 131072, "on"), "batch_size": 2}]  # a second row at 128K
    merge_results(folder / "speed.json", {"device": "dev"}, rows)
    text = markdown_for_device(folder)
    expected = "CPU allocation cache (`longrange.cpu_cache`): routing at 128K; sinkhorn at 16K, 64K.\n"
    assert expected in text
    merge_results(folder / "speed.json", {"device": "dev"}, [row("vanilla", 512)], keys=("suite",))
    assert "CPU allocation cache" not in markdown_for_device(folder)


def test_matmul_peak_rejects_bad_repeats():
    from longrange.bench.flops import matmul_peak

    with pytest.raises(ValueError, match="repeats must be >= 1"):
        matmul_peak("cpu", size=8, repeats=0)
    assert matmul_peak("cpu", size=64, repeats=2) > 0


def test_unknown_suite_and_task():
    with pytest.raises(ValueError, match="unknown bench suite"):
        run_suite("nope", ["vanilla"], [], device="cpu", options={})
    with pytest.raises(ValueError, match="unknown task"):
        train_on_task("vanilla", "nope", steps=1)


def test_each_family_keeps_one_colour_on_every_panel():
    labels = ["vanilla", "routing", "routing (reference)", "sinkhorn", "performer (reference)", "performer"]
    styles = series_styles(labels)
    assert set(styles) == set(labels)
    assert styles["vanilla"]["color"] == "black"
    assert styles["routing (reference)"]["color"] == styles["routing"]["color"]
    assert styles["performer (reference)"]["color"] == styles["performer"]["color"]
    assert styles["routing (reference)"]["linestyle"] == "--" and styles["routing"]["linestyle"] == "-"
    ours = [styles[f]["color"] for f in ("vanilla", "routing", "sinkhorn", "performer")]
    assert len(set(ours)) == len(ours)
    # a panel that leaves the reference series out must not shift any colour
    assert series_styles(["vanilla", "routing", "sinkhorn", "performer"])["sinkhorn"] == styles["sinkhorn"]


def test_mfu_is_against_the_peak_measured_around_the_point(monkeypatch):
    """The best of the matmul rates measured just before and just after the timed steps, not
    the run's first reading (this CPU's speed drifts within minutes)."""
    from longrange.bench import speed

    readings = iter([2e9, 3e9])
    monkeypatch.setattr(speed, "matmul_peak", lambda device, repeats: next(readings))
    row = speed.time_point("vanilla", 32, device="cpu", repeats=1, batch_size=1, mfu=True)
    assert row["matmul_peak_gflops"] == 3.0
    assert row["mfu"] == pytest.approx(row["fwd_bwd_flops"] / row["fwd_bwd_s"] / 3e9)
    assert "mfu" not in speed.time_point("vanilla", 32, device="cpu", repeats=1, batch_size=1)


def test_the_report_gives_the_matmul_peaks_its_mfu_figures_use():
    """Each row's MFU is against the peak measured around its point; the header gives their
    range, not the peak of whichever run wrote the file last."""
    from longrange.bench.report import _peaks

    env = {"environment": {"matmul_peak_gflops": "349.7"}}
    rows = [{"matmul_peak_gflops": 297.6}, {"matmul_peak_gflops": 367.9}, {"family": "x"}]
    assert _peaks({**env, "results": rows}) == "matmul peak measured around each point, 298-368 GFLOP/s"
    assert _peaks({**env, "results": rows[:1]}) == "matmul peak 298 GFLOP/s"
    assert _peaks({**env, "results": []}) == "matmul peak 349.7 GFLOP/s"
