import json

import pytest
import torch

from longrange.bench.speed import format_table, memory_in_fresh_process, run_speed_suite
from longrange.cli import main


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


def test_a_child_returns_its_last_line_or_why_it_failed():
    from longrange.bench.memory import run_child

    assert run_child(
        "longrange.bench.speed", ["--reference", "no_such_family", "64", "1", "0", "reference"]
    ) == (
        None,
        "KeyError: 'no_such_family'",
    )
    out, reason = run_child(
        "longrange.bench.speed", ["--reference", "performer", "16", "1", "0", "longrange"]
    )
    assert reason == "" and json.loads(out)[0]["family"] == "performer (reference defaults)"


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
    # the reference-defaults pairs: causal PerformerLM against the package and against exact
    # attention, the package's own non-causal default against the package
    pairs = json.loads(next(tmp_path.glob("*/reference_defaults.json")).read_text())["results"]
    assert sorted((p["setting"], p["against"]) for p in pairs) == [
        ("causal, 266 features", "exact SDPA attention"),
        ("causal, 266 features", "reference package"),
        ("package defaults: non-causal, 266 features", "reference package"),
    ]
    for pair in pairs:
        assert pair["class"] == "PerformerLM" and pair["length"] == 64
        assert pair["speedup"] == pytest.approx(pair["other_s"] / pair["longrange_s"])


def test_exact_performer_is_the_same_model_with_softmax_attention():
    from longrange.bench.reference import ExactAttention, build
    from longrange.ops.dense import dense_attention_naive
    from longrange.testing import assert_causal, assert_close

    exact, favor = build("performer", 64, "exact"), build("performer", 64, "longrange")
    assert sum(isinstance(m, ExactAttention) for m in exact.modules()) == 4
    assert [n for n, _ in exact.named_parameters()] == [n for n, _ in favor.named_parameters()]
    q, k, v = torch.randn(3, 1, 2, 20, 8).unbind(0)
    assert_close(ExactAttention()(q, k, v), dense_attention_naive(q, k, v, causal=True), 1e-5)
    assert_causal(exact.eval(), torch.randint(0, 256, (1, 40)), 256)
    with pytest.raises(ValueError, match="Performer's comparison only"):
        build("routing", 64, "exact")
    with pytest.raises(ValueError, match="source must be one of"):
        build("performer", 64, "ours")


def test_each_class_and_its_comparison_are_timed_in_turn():
    """One process, a step of each per round: a pair's speed-up is the median of the rounds'
    ratios (the Performer against its exact twin, the others against their reference), and
    neither is timed again on its own; where that child fails, each is timed alone."""
    from longrange.bench.reference import CHUNK_ROUNDS, compare_at_defaults, time_in_turn

    ours, exact = time_in_turn("performer", 64, repeats=3, sources=("longrange", "exact"))
    assert ours["family"] == "performer (reference defaults)" and "paired_speedup" not in ours
    assert exact["family"] == "performer (exact SDPA)" and exact["paired_speedup"] > 0
    alone, in_turn = [], []

    def timer(family, length, repeats, source="reference", fill=None):
        alone.append((source, fill))
        return {"length": length, "fwd_bwd_s": 1.0}

    def timer_in_turn(family, length, repeats, sources, fill=None):
        in_turn.append((family, sources, fill))
        rounds.append(repeats)
        if family == "routing":
            return [{"length": length, "error": "killed"}, {"length": length, "error": "killed"}]
        return [{"length": length, "fwd_bwd_s": 1.0}, {"fwd_bwd_s": 2.0, "paired_speedup": 2.5}]

    rounds = []
    table = [{"length": 64, "fwd_bwd_s": 3.0}]
    pairs = compare_at_defaults("performer", [64], table, repeats=1, timer=timer, timer_in_turn=timer_in_turn)
    assert [(p["against"], p["speedup"]) for p in pairs] == [
        ("reference package", 3.0),
        ("exact SDPA attention", 2.5),
    ]
    pairs = compare_at_defaults("memorizing", [64], [], repeats=1, timer=timer, timer_in_turn=timer_in_turn)
    assert pairs[0]["speedup"] == 2.5 and pairs[0]["against"] == "reference package"
    assert alone == [] and in_turn == [
        ("performer", ("longrange", "exact"), None),
        ("memorizing", ("longrange", "reference"), 32768),
    ]
    assert rounds == [1, CHUNK_ROUNDS]  # the cheap per-chunk pair takes more rounds
    pairs = compare_at_defaults("routing", [64], table, repeats=1, timer=timer, timer_in_turn=timer_in_turn)
    assert alone == [("longrange", None)] and pairs[0]["speedup"] == 3.0


def test_package_defaults_without_causal_are_compared_against_the_package():
    """PerformerLM, RoutingTransformerLM and SinkhornTransformerLM are non-causal by their
    packages' defaults: each family has that variant, every keyword at the package's default
    on both sides, paired with the reference package (the Performer's too), in one process."""
    from longrange.bench.reference import build, compare_at_defaults, variants

    assert variants("performer") == ["performer/noncausal"]
    assert variants("memorizing") == [] and variants("block_recurrent") == []
    ours = build("routing/noncausal", 256, "longrange")
    assert type(ours).__name__ == "RoutingTransformerLM" and not ours.config.causal
    assert ours.config.window_size == 64 and ours.config.n_local_attn_heads == 0
    assert not build("performer/noncausal", 64, "longrange").config.causal
    assert not build("sinkhorn/noncausal", 256, "longrange").config.causal
    in_turn = []

    def timer_in_turn(family, length, repeats, sources, fill=None):
        in_turn.append((family, sources))
        return [{"length": length, "fwd_bwd_s": 1.0}, {"fwd_bwd_s": 2.0, "paired_speedup": 1.9}]

    pairs = compare_at_defaults(
        "performer/noncausal", [64], [], repeats=1, timer=None, timer_in_turn=timer_in_turn
    )
    assert in_turn == [("performer/noncausal", ("longrange", "reference"))]
    assert [(p["class"], p["setting"], p["against"], p["speedup"]) for p in pairs] == [
        ("PerformerLM", "package defaults: non-causal, 266 features", "reference package", 1.9)
    ]


def test_memorizing_per_chunk_with_filled_memories():
    from longrange.bench.reference import time_reference_point

    row = time_reference_point("memorizing", 512, repeats=1, source="longrange", fill=1024)
    assert row["family"] == "memorizing (reference defaults)" and row["filled"] == 1024
    assert row["tokens_per_s"] == pytest.approx(512 / row["fwd_bwd_s"])


def test_chunked_memorizing_cleans_up_when_dropped_and_at_exit():
    """Its memory folder goes when the model is collected, and at interpreter exit with no
    traceback (a __del__ there once ran after the module's globals were gone)."""
    import gc
    import os
    import subprocess
    import sys

    from longrange.bench.reference import build, reference_step

    model = build("memorizing", 512, "longrange", fill=512)
    reference_step(model, torch.randint(0, 256, (1, 513)))
    folder = model.directory
    assert os.path.isdir(folder)
    del model
    gc.collect()
    assert not os.path.exists(folder)
    script = (
        "import torch\n"
        "from longrange.bench import reference as R\n"
        "m = R.build('memorizing', 512, 'longrange', fill=512)\n"
        "R.reference_step(m, torch.randint(0, 256, (1, 513)))\n"
        "print(m.directory)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not os.path.exists(done.stdout.strip())


def test_compiled_speed_is_reported_beside_eager(tmp_path, monkeypatch):
    calls = []

    def quick_compile(fn, **kwargs):  # tracing without code generation keeps the test short
        calls.append(fn)
        return real_compile(fn, backend="eager")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", quick_compile)
    rows = run_speed_suite(
        ["vanilla"], [32], device="cpu", repeats=1, out_dir=tmp_path, memory=False, compile=True
    )
    row = rows[0]
    assert len(calls) == 1 and calls[0].__name__ == "forward_lm"
    assert row["compiled_fwd_bwd_s"] > 0 and row["compile_s"] >= 0
    assert row["compiled_tokens_per_s"] == pytest.approx(32 / row["compiled_fwd_bwd_s"])
    assert "compiled tok/s" in format_table(rows)


def test_a_later_pass_keeps_the_parts_it_did_not_measure(tmp_path):
    """Re-timing a point eagerly (a partial ``bench speed`` run) keeps its compiled figures and
    peak from the earlier pass, dated; a pass that measures them replaces them; a failed row
    keeps nothing of the earlier one."""
    from longrange.bench.results import merge_results, results_path

    path = results_path(tmp_path, "cpu", "speed")
    first = {"family": "vanilla", "length": 64, "batch_size": 1, "fwd_bwd_s": 2.0, "measured_at": "t1"}
    first.update(compiled_fwd_bwd_s=1.0, compiled_tokens_per_s=64.0, compile_s=3.0, peak_mb=10.0)
    other = {"family": "vanilla", "length": 32, "batch_size": 1, "fwd_bwd_s": 1.0, "measured_at": "t1"}
    merge_results(path, {"device": "cpu"}, [first, other])

    def rows():
        return {r["length"]: r for r in json.loads(path.read_text())["results"]}

    again = {"family": "vanilla", "length": 64, "batch_size": 1, "fwd_bwd_s": 1.5, "measured_at": "t2"}
    merge_results(path, {"device": "cpu"}, [again])
    row = rows()[64]
    assert row["fwd_bwd_s"] == 1.5 and row["measured_at"] == "t2"
    assert row["compiled_fwd_bwd_s"] == 1.0 and row["compile_s"] == 3.0 and row["peak_mb"] == 10.0
    assert row["compiled_measured_at"] == "t1" and row["peak_measured_at"] == "t1"
    assert rows()[32] == other
    # a pass that compiles replaces the compiled part (and dates it by the row)
    compiled = {**again, "measured_at": "t3", "compiled_fwd_bwd_s": 0.5, "compile_s": 1.0}
    merge_results(path, {"device": "cpu"}, [compiled])
    row = rows()[64]
    assert row["compiled_fwd_bwd_s"] == 0.5 and "compiled_measured_at" not in row
    assert row["peak_mb"] == 10.0 and row["peak_measured_at"] == "t1"
    failed = {"family": "vanilla", "length": 64, "batch_size": 1, "error": "out of memory"}
    merge_results(path, {"device": "cpu"}, [failed])
    assert rows()[64] == failed


def test_reference_defaults_table_in_the_readme(tmp_path):
    from longrange.bench.report import write_report
    from longrange.bench.results import merge_results, results_path

    pair = {"family": "routing", "class": "RoutingTransformerLM", "setting": "causal, 2 local heads"}
    pair.update(length=8192, against="reference package", longrange_s=0.5, other_s=1.0, speedup=2.0)
    failed = {**pair, "family": "performer", "class": "PerformerLM", "setting": "causal", "speedup": None}
    failed.update(other_s=None, other_error="killed", against="reference package")
    merge_results(results_path(tmp_path, "cpu", "reference_defaults"), {"device": "cpu"}, [pair, failed])
    body = write_report(tmp_path, tmp_path / "README.md")
    row = "| RoutingTransformerLM (causal, 2 local heads) | 8K | reference package | 500 ms | 1,000 ms |"
    assert row + " 2.00x |" in body
    assert "| PerformerLM (causal) | 8K | reference package | 500 ms | fails | - |" in body


@pytest.mark.parametrize("flag", ["--lengths", "--reference-lengths"])
def test_cli_refuses_lengths_that_are_not_integers_in_one_line(flag, capsys, tmp_path):
    assert main(["bench", "speed", flag, "1024,abc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{flag} takes comma-separated integers, got '1024,abc'" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_report_without_a_results_folder_is_refused_and_leaves_the_readme(tmp_path, capsys, monkeypatch):
    """Run from the wrong folder, `bench report` used to write empty tables into the README it
    found there; it now says which folder it looked for."""
    readme = tmp_path / "README.md"
    readme.write_text("# mine\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "report"]) == 2
    err = capsys.readouterr().err
    assert "no results folder 'benchmarks/results'" in err and err.count("\n") == 1
    assert readme.read_text() == "# mine\n"
