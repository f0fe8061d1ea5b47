import json

import numpy as np
import pytest

from longrange.bench import context_suite
from longrange.bench.context_report import START, ablation_summary, write_context_report
from longrange.bench.context_suite import ContextSetup, run_context_suite
from longrange.bench.context_variants import ABLATIONS, LM_MODELS, RECALL_MODELS, ModelSpec
from longrange.cli import main
from longrange.data.corpus import Corpus, Document
from longrange.models.registry import FAMILIES, make_config


def _doc(name: str, n: int, seed: int) -> Document:
    rng = np.random.default_rng(seed)
    words = [b"def ", b"return ", b"self", b".x", b" = ", b"(a, b)\n", b"    ", b"if ", b"import os\n"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), n))[:n]
    return Document(name, np.frombuffer(text, dtype=np.uint8))


def _config_diff(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: f"{a.family}-{a.name}")
def test_an_ablation_differs_from_its_pair_only_in_the_named_setting(ablation):
    on, off = ablation.specs()
    assert on == LM_MODELS[ablation.family]
    assert (off.family, off.preset, off.call_len) == (on.family, on.preset, on.call_len)
    assert _config_diff(on.config_dict(), off.config_dict()) == set(ablation.setting)


def test_the_settings_mean_what_the_labels_say():
    heads = {f: make_config(f, LM_MODELS[f].preset, **LM_MODELS[f].settings).heads for f in LM_MODELS}
    by_name = {(a.family, a.name): a for a in ABLATIONS}
    assert by_name["routing", "routing"].setting == {"n_local_attn_heads": heads["routing"]}
    assert by_name["sinkhorn", "sorting"].setting == {"n_local_attn_heads": heads["sinkhorn"]}
    exact = by_name["performer", "favor"].setting
    assert exact["local_attn_heads"] == (heads["performer"],)
    # a local window looks back one window: two windows cover the trained context
    assert 2 * exact["local_window_size"] >= LM_MODELS["performer"].config_dict()["max_seq_len"]
    assert set(LM_MODELS) == set(RECALL_MODELS) == set(FAMILIES)


TINY_LM = {
    "vanilla": ModelSpec("vanilla", "tiny", {"max_seq_len": 64}),
    "block_recurrent": ModelSpec(
        "block_recurrent", "tiny", {"max_seq_len": 64, "block_width": 16, "num_state_vectors": 4}, 16
    ),
    "memorizing": ModelSpec(
        "memorizing", "tiny", {"max_seq_len": 16, "max_knn_memories": 256, "num_retrieved_memories": 4}
    ),
}
TINY_RECALL = {
    "vanilla": ModelSpec("vanilla", "tiny", {"max_seq_len": 128}),
    "block_recurrent": ModelSpec("block_recurrent", "tiny"),
    "memorizing": ModelSpec("memorizing", "tiny", {"max_knn_memories": 512}),
}
TINY = ContextSetup(
    context=64,
    lm_models=TINY_LM,
    recall_models=TINY_RECALL,
    min_doc_bytes=600,
    curve_points=2,
    curve_docs=1,
    recall_distances=(64, 160),
    recall_train_distance=64,
    recall_examples=2,
)
CORPUS = Corpus("toy", [_doc(f"t{i}", 700, i) for i in range(4)], [_doc("v0", 800, 10), _doc("v1", 650, 11)])


def test_suite_json_schema_plots_and_readme(tmp_path):
    families = list(TINY_LM)
    rows = run_context_suite(
        families,
        device="cpu",
        steps=1,
        seeds=(0, 1),
        out_dir=tmp_path,
        setup=TINY,
        corpus=CORPUS,
        log=lambda s: None,
    )
    (path,) = tmp_path.glob("*/context.json")
    data = json.loads(path.read_text())
    assert data["suite"] == "context" and {"device", "torch", "threads"} <= set(data["environment"])
    assert len(data["results"]) == len(rows)
    for row in data["results"]:
        assert {"part", "device", "measured_at"} <= set(row)
    by_part = {
        p: [r for r in data["results"] if r["part"] == p]
        for p in ("position", "ablation", "recall", "compute", "run")
    }
    common = {"family", "seed", "config", "steps", "budget_s", "calibrated_step_s", "train_s", "bpb", "reach"}
    for row in by_part["position"]:
        assert common | {"buckets", "position_curve", "bytes"} <= set(row)
        assert row["bytes"] == 799 + 649 and sum(b["count"] for b in row["buckets"]) == row["bytes"]
    for row in by_part["compute"]:
        assert common | {"train_curve"} <= set(row)
        assert [p["step"] for p in row["train_curve"]] == [1]
    assert {r["family"] for r in by_part["position"]} == set(families)
    # ablations: every (family, ablation, seed) has both sides, with equal steps and seed, and
    # the recorded configs differ exactly in the named setting
    sides = {}
    for row in by_part["ablation"]:
        assert common | {"ablation", "side", "mechanism", "label", "setting"} <= set(row)
        sides.setdefault((row["family"], row["ablation"], row["seed"]), {})[row["side"]] = row
    assert len(sides) == 3 * 2  # block_recurrent 1 + memorizing 2, over two seeds
    for pair in sides.values():
        on, off = pair["on"], pair["off"]
        assert (on["steps"], on["seed"], on["call_len"]) == (off["steps"], off["seed"], off["call_len"])
        assert _config_diff(on["config"], off["config"]) == set(off["setting"])
    assert len(ablation_summary(by_part["ablation"])) == 3
    for row in by_part["recall"]:
        assert {"task", "train_distance", "distances", "reach", "steps"} <= set(row)
        cells = {c["distance"]: c for c in row["distances"]}
        assert set(cells) == {64, 160}
        if row["family"] == "vanilla":  # a 160-token example does not fit a 128 window
            assert not cells[160]["reachable"] and "exceeds the context (128)" in cells[160]["reason"]
        else:
            assert cells[160]["reachable"] and 0 <= cells[160]["accuracy"] <= 1
    (run,) = by_part["run"]
    assert run["parts"] == "position,ablation,recall,compute" and run["wall_s"] > 0
    assert (path.parent / "context_position.png").is_file() and (
        path.parent / "context_compute.png"
    ).is_file()

    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- bench:start -->\nspeed\n<!-- bench:end -->\n\n## After\n")
    write_context_report(tmp_path, readme)
    write_context_report(tmp_path, readme)  # idempotent: one block, still after the bench block
    text = readme.read_text()
    assert text.count(START) == 1
    assert text.index("<!-- bench:end -->") < text.index(START) < text.index("## After")
    assert "| vanilla | 64 bytes (window) |" in text and "recurrent states" in text
    assert "out of reach" in text and "- **memorizing**:" in text


def test_suite_rerun_replaces_its_rows(tmp_path):
    kwargs = dict(device="cpu", steps=1, out_dir=tmp_path, setup=TINY, corpus=CORPUS, log=lambda s: None)
    run_context_suite(["vanilla"], parts=("position",), seeds=(0,), **kwargs)
    run_context_suite(["vanilla"], parts=("position",), seeds=(0,), **kwargs)
    (path,) = tmp_path.glob("*/context.json")
    parts = [r["part"] for r in json.loads(path.read_text())["results"]]
    assert sorted(parts) == ["position", "run"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--parts", "position,speed"],
            "--parts takes a comma-separated subset of position,ablation,recall,compute",
        ),
        (["--parts", ""], "--parts takes"),
        (["--parts", "recall,recall"], "--parts takes"),
        (["--budget", "0"], "--budget must be a positive number of seconds"),
        # calibrated first, then failed turning an infinite budget into a step count
        (["--budget", "inf"], "--budget must be a positive number of seconds (finite), got inf"),
        (["--recall-budget", "-1"], "--recall-budget must be a positive number of seconds"),
        (["--recall-budget", "inf"], "--recall-budget must be a positive number of seconds"),
        (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
        (["--seeds", "1,1"], "--seeds must be distinct"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--models", "nope"], "unknown model family 'nope'"),
    ],
    ids=[
        "part",
        "no-part",
        "part-twice",
        "budget",
        "budget-inf",
        "recall-budget",
        "recall-budget-inf",
        "seed-text",
        "seed-twice",
        "steps",
        "family",
    ],
)
def test_cli_refuses_bad_options_in_one_line(argv, message, capsys, tmp_path):
    assert main(["bench", "context", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_cli_passes_the_options_through(monkeypatch, tmp_path):
    seen = {}

    def fake(families, **kwargs):
        seen.update(kwargs, families=families)
        return []

    monkeypatch.setattr(context_suite, "run_context_suite", fake)
    assert main(["bench", "context", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert seen["families"] == list(FAMILIES) and seen["parts"] == context_suite.PARTS
    defaults = (context_suite.DEFAULT_BUDGET_S, context_suite.DEFAULT_RECALL_BUDGET_S, (0, 1), None)
    assert (seen["budget_s"], seen["recall_budget_s"], seen["seeds"], seen["steps"]) == defaults
    argv = [
        "--models",
        "vanilla,memorizing",
        "--parts",
        "recall,position",
        "--budget",
        "12.5",
        "--seeds",
        "3,4",
        "--recall-budget",
        "30",
    ]
    assert main(["bench", "context", "--out", str(tmp_path), "--device", "cpu", *argv, "--steps", "7"]) == 0
    assert seen["families"] == ["vanilla", "memorizing"] and seen["parts"] == ("recall", "position")
    assert seen["recall_budget_s"] == 30.0
    assert (seen["budget_s"], seen["seeds"], seen["steps"], seen["out_dir"]) == (
        12.5,
        (3, 4),
        7,
        str(tmp_path),
    )


def test_performer_local_windows_of_half_the_input_are_exact_attention():
    # the performer ablation's "exact" side: windows of N/2 looking back one window see every
    # earlier position of an N-token input, as one window of N does
    import torch

    from longrange.models.registry import create_model

    torch.manual_seed(0)
    half = create_model("performer", "tiny", max_seq_len=64, local_attn_heads=(2,), local_window_size=32)
    whole = create_model("performer", "tiny", max_seq_len=64, local_attn_heads=(2,), local_window_size=64)
    whole.load_state_dict(half.state_dict())
    tokens = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(half(tokens), whole(tokens), rtol=1e-4, atol=1e-4)


def test_a_failing_run_becomes_an_error_row_and_the_suite_goes_on(tmp_path):
    broken = dict(TINY_LM, vanilla=ModelSpec("vanilla", "tiny", {"max_seq_len": 32}))  # < context 64
    setup = ContextSetup(**{**TINY.__dict__, "lm_models": broken})
    rows = run_context_suite(
        ["vanilla", "block_recurrent"],
        parts=("position",),
        seeds=(0,),
        device="cpu",
        steps=1,
        out_dir=tmp_path,
        setup=setup,
        corpus=CORPUS,
        log=lambda s: None,
    )
    by_family = {r["family"]: r for r in rows if r["part"] == "position"}
    assert "exceeds max_seq_len" in by_family["vanilla"]["error"]
    assert "error" not in by_family["block_recurrent"] and by_family["block_recurrent"]["bpb"] > 0
