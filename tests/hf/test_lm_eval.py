"""lm-evaluation-harness scores a saved model with ``--model hf`` on a local task, and its bits
per byte are longrange's own evaluation of the same text."""

import math
import sys

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")

import longrange.hf as lh
from longrange.hf import harness
from longrange.testing import import_reference


@pytest.fixture(autouse=True)
def _lm_eval():
    # lm-eval is in the dev extra: skipped without it, a failure when the dev extra is installed.
    return import_reference("lm_eval")


# Documents of different lengths, some longer than every tiny model's max_seq_len, so that the
# model reads them in segments (with its state carried, for the families that carry one).
TEXTS = [
    "import os\n\n\ndef main():\n    print(os.getcwd())\n",
    "".join(f"def f{i}(x, y={i}):\n    return x * {i} + y  # n{i}\n" for i in range(12)),
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 4,
    "caf\u00e9 = 'na\u00efve'  # non-ASCII bytes count as bytes\n",
]


def test_lm_eval_bits_per_byte_equal_longrange_evaluation(family, saved_lr, tmp_path):
    model, lr_dir = saved_lr(family)
    lh.export_hf(lr_dir, tmp_path / "hf")
    assert max(len(t.encode()) for t in TEXTS) > model.config.max_seq_len
    hf_bpb, lr_bpb = harness.compare(tmp_path / "hf", TEXTS, tmp_path / "task")
    assert math.isfinite(hf_bpb) and hf_bpb > 0
    assert abs(hf_bpb - lr_bpb) < harness.AGREEMENT, (hf_bpb, lr_bpb)


def test_the_documented_command(saved_lr, text_folder, tmp_path, capsys):
    _, lr_dir = saved_lr("vanilla")
    lh.export_hf(lr_dir, tmp_path / "hf")
    task_dir = tmp_path / "task"
    code = harness.main(
        ["compare", str(tmp_path / "hf"), "--data", str(text_folder), "--task-dir", str(task_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    hf_line = lines["lm-eval (hf, loglikelihood_rolling)"]
    lr_line = next(v for k, v in lines.items() if k.startswith("longrange evaluate_bpb"))
    assert hf_line.split(": ")[1].split()[0] == lr_line.split(": ")[1].split()[0]


def test_lm_eval_command_line_runs_with_the_families_registered(monkeypatch):
    # `python -m longrange.hf.harness lm-eval ARGS` is lm-eval's own command line (the real
    # one indexes every built-in task, 15 s; the comparison above runs the same hf model).
    import lm_eval.__main__

    seen = {}

    def cli_evaluate():
        from transformers import AutoConfig

        seen["argv"] = sys.argv[:]
        seen["registered"] = AutoConfig.for_model("longrange_vanilla").family

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", cli_evaluate)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    assert harness.main(["lm-eval", "run", "--model", "hf", "--tasks", "x"]) == 0
    assert seen == {"argv": ["lm-eval", "run", "--model", "hf", "--tasks", "x"], "registered": "vanilla"}


def test_compare_refuses_a_missing_model_before_lm_eval_runs(tmp_path, capsys):
    assert harness.main(["compare", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longrange.hf.harness: error: no config.json") and len(err.splitlines()) == 1


def test_write_task_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        harness.write_task(tmp_path, [])
    with pytest.raises(ValueError, match="identifier"):
        harness.write_task(tmp_path, ["x"], name="not a name")
