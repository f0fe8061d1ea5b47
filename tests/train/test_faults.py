"""Runs that survive faults (issue 17): set-up errors leave nothing, non-finite steps,
file-system errors, SIGINT / SIGTERM, stale kNN memory folders."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from longrange.cli import main
from longrange.data.corpus import load_corpus
from longrange.train.interrupts import TrainingInterrupted
from longrange.train.leftovers import remove_stale_knn_folders
from longrange.train.resume import TrainingDiverged
from longrange.train.trainer import LossStep, Trainer

from .test_resume import _cfg, assert_same_run


def _snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


# --- set-up ------------------------------------------------------------------------------------
def _one_document(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 40}) + "\n")
    return path


@pytest.mark.parametrize(
    "overrides, data, message",
    [
        ({"set": {"vocab_size": 10}}, None, "vocab_size 10 is too small for byte data"),
        ({}, "one-document", r"no validation tokens: .*one\.jsonl holds 1 document"),
        ({"set": {"max_seq_len": 16}}, None, "--seq-len 32 exceeds the model's max_seq_len 16"),
    ],
    ids=["vocab", "one-document", "seq-len"],
)
def test_a_refused_run_leaves_no_folder(tmp_path, text_folder, overrides, data, message):
    corpus = load_corpus(_one_document(tmp_path) if data else text_folder)
    with pytest.raises(ValueError, match=message):
        Trainer(_cfg(tmp_path, **overrides), corpus=corpus).fit()
    assert not (tmp_path / "runs").exists()
    result = Trainer(_cfg(tmp_path, steps=1), corpus=load_corpus(text_folder)).fit()
    assert Path(result["run_dir"]).name == "t"  # not t-2


# --- non-finite steps --------------------------------------------------------------------------
def _poison(monkeypatch, bad_calls):
    """Make the loss NaN on the given forward calls (1-based), as an overflow would."""
    real, calls = LossStep.forward, [0]

    def forward(self, inputs, targets, state=None):
        calls[0] += 1
        loss, aux, state = real(self, inputs, targets, state)
        return (loss * float("nan") if calls[0] in bad_calls else loss), aux, state

    monkeypatch.setattr(LossStep, "forward", forward)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, text_folder, monkeypatch, capsys):
    _poison(monkeypatch, {2, 5})
    trainer = Trainer(_cfg(tmp_path, steps=6), corpus=load_corpus(text_folder))
    result = trainer.fit()
    assert result["skipped_steps"] == 2
    records = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [2, 5]
    assert records[-1]["skipped_steps"] == 2 and records[2]["train_loss"] is None
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {4}  # 6 steps, 2 without an update
    assert "step 2: the loss is nan; the step was skipped" in capsys.readouterr().err


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(tmp_path, text_folder, monkeypatch):
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(
        TrainingDiverged, match=r"stopped at step 5: .* for 2 steps in a row.*checkpoint \(step 3\)"
    ):
        Trainer(_cfg(tmp_path, max_nonfinite_steps=2, save_every=1), corpus=load_corpus(text_folder)).fit()
    root = tmp_path / "runs" / "t" / "checkpoints"
    assert json.loads((root / "latest.json").read_text())["step"] == 3  # none during the NaN steps
    monkeypatch.undo()
    Trainer(_cfg(tmp_path, lr=1e-3), resume=str(root.parent), corpus=load_corpus(text_folder)).fit()


def test_non_finite_weights_are_never_checkpointed(tmp_path, text_folder):
    trainer = Trainer(_cfg(tmp_path, steps=3), corpus=load_corpus(text_folder))
    trainer.fit()
    run = tmp_path / "runs" / "t"
    before = _snapshot(run / "checkpoints")
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    trainer.step += 1
    with pytest.raises(TrainingDiverged, match=r"not writing a checkpoint at step 4: .* non-finite"):
        trainer.save()
    assert _snapshot(run / "checkpoints") == before


def test_loss_scale_overflows_are_skipped_but_are_not_faults(tmp_path, text_folder):
    # fp16 needs CUDA; a CPU GradScaler takes the same path through train_step.
    trainer = Trainer(_cfg(tmp_path, steps=3), corpus=load_corpus(text_folder))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # scaled gradients overflow
    loss, skipped, fault = trainer.train_step()
    assert math.isfinite(loss) and skipped and not fault
    assert trainer.scaler.get_scale() == 2.0**126  # the scaler backs off by itself
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert trainer.train_step()[1:] == (False, False)
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}


def test_a_huge_learning_rate_stops_with_a_clear_error(tmp_path, text_folder, capsys):
    args = ["train", "--preset", "tiny", "--set", "max_seq_len=32", "--data", str(text_folder)]
    args += ["--steps", "20", "--batch-size", "2", "--eval-tokens", "128", "--save-every", "2"]
    args += [
        "--out",
        str(tmp_path / "runs"),
        "--no-progress",
        "--device",
        "cpu",
        "--lr",
        "1e30",
        "--warmup",
        "0",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "not finite for 5 steps in a row" in err[-1] and err[-1].startswith("longrange train: error:")
    for path in (tmp_path / "runs").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path


# --- the file system ---------------------------------------------------------------------------
def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(tmp_path, text_folder, monkeypatch, capsys):
    import longrange.train.resume as resume

    corpus_args = [
        "--preset",
        "tiny",
        "--set",
        "max_seq_len=32",
        "--data",
        str(text_folder),
        "--batch-size",
        "2",
    ]
    common = ["train", *corpus_args, "--eval-tokens", "128", "--save-every", "3", "--eval-every", "3"]
    common += ["--out", str(tmp_path / "runs"), "--name", "t", "--no-progress", "--device", "cpu"]
    real_begin, real_fsync, full = resume.begin_checkpoint, os.fsync, [False]

    def begin(run_dir, step):
        full[0] = step == 6
        return real_begin(run_dir, step)

    def fsync(fd):
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(resume, "begin_checkpoint", begin)
    monkeypatch.setattr(os, "fsync", fsync)
    assert main([*common, "--steps", "3"]) == 0
    run = tmp_path / "runs" / "t"
    before = {
        **_snapshot(run / "checkpoints"),
        run / "model.safetensors": (run / "model.safetensors").read_bytes(),
    }
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("longrange train: resuming")  # then one line
    assert "step-000006.tmp/" in err[1] and "cannot write the checkpoint of step 6" in err[1]
    assert "No space left on device" in err[1] and "step 3, is untouched" in err[1]
    after = {
        **_snapshot(run / "checkpoints"),
        run / "model.safetensors": (run / "model.safetensors").read_bytes(),
    }
    assert after == before  # the staging folder is gone, step 3 as it was


def test_file_system_errors_are_one_line_naming_the_path(tmp_path, text_folder, monkeypatch, capsys):
    import longrange.train.run_folder as run_folder

    args = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_seq_len=32",
        "--data",
        str(text_folder),
        "--steps",
        "3",
    ]
    args += ["--batch-size", "2", "--eval-tokens", "128", "--no-progress", "--device", "cpu", "--name", "t"]
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main([*args, "--out", str(tmp_path / "ro")]) == 1
    line = capsys.readouterr().err.strip()
    assert (
        line
        == f"longrange train: error: {tmp_path / 'ro'}: cannot create the --out folder: Permission denied"
    )
    monkeypatch.undo()

    assert main([*args, "--out", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "t"
    before = _snapshot(run)

    class ReadOnlyLock:
        def __init__(self, path):
            self.path, self.is_locked = path, False

        def acquire(self, timeout=None):
            raise PermissionError(errno.EACCES, "Permission denied", self.path)

    monkeypatch.setattr(run_folder, "FileLock", ReadOnlyLock)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    cause = "cannot lock the run folder (is it writable?): Permission denied"
    assert line == f"longrange train: error: {run / '.lock'}: {cause}"
    assert _snapshot(run) == before


def test_unreadable_data_names_the_file(tmp_path, monkeypatch):
    data = tmp_path / "book.txt"
    data.write_text("some text " * 100)
    real = Path.read_bytes

    def unreadable(self):
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(PermissionError) as info:
        load_corpus(data)
    assert (
        info.value.filename == str(data)
        and "cannot read --data file: Permission denied" in info.value.strerror
    )


# --- signals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_saves_between_steps_and_the_run_resumes_exactly(
    tmp_path, text_folder, monkeypatch, signum, code
):
    before = signal.getsignal(signal.SIGINT)  # ignored where the suite runs in the background
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, name="full"), corpus=corpus).fit()
    real = Trainer.train_step

    def train_step(self):
        out = real(self)
        if self.step == 4:
            os.kill(os.getpid(), signum)  # arrives in the middle of the loop
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_cfg(tmp_path, name="cut"), corpus=corpus).fit()
    monkeypatch.undo()
    assert info.value.exit_code == code and info.value.step == 4
    assert info.value.checkpoint.name == "step-000004"
    assert signal.getsignal(signal.SIGINT) is before  # handlers given back
    run = tmp_path / "runs" / "cut"
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 4
    Trainer(_cfg(tmp_path, name="cut"), resume=str(run), corpus=corpus).fit()
    assert_same_run(tmp_path / "runs" / "full", run)


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, text_folder, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    real = Trainer.train_step

    def train_step(self):
        out = real(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # impatient
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted, match="a second time: stopped at once") as info:
        Trainer(_cfg(tmp_path), corpus=load_corpus(text_folder)).fit()
    assert info.value.exit_code == 130 and info.value.checkpoint is None
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_on_the_command_line_saves_cleans_up_and_exits_143(tmp_path, text_folder):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = tmp / "longrange-knn-stale"  # left by a killed process
    stale.mkdir()
    (stale / "OWNER").write_text(str(_dead_pid()))
    run = tmp_path / "runs" / "m"
    cmd = [sys.executable, "-m", "longrange.cli", "train", "--model", "memorizing", "--preset", "tiny"]
    cmd += ["--set", "max_seq_len=32", "--set", "max_knn_memories=64", "--data", str(text_folder)]
    cmd += ["--steps", "100000", "--batch-size", "2", "--eval-tokens", "128", "--save-every", "100000"]
    cmd += ["--out", str(tmp_path / "runs"), "--name", "m", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a few training steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM after step" in err and f"longrange train --resume {run}" in err
    step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert step > 0 and f"saved checkpoint {run / 'checkpoints' / f'step-{step:06d}'}" in err
    assert not list(tmp.glob("longrange-knn-*"))  # its own memory files and the stale folder


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_knn_folders_of_dead_processes_are_removed(tmp_path):
    from longrange.models.registry import create_model

    def folder(name, *, owner=None, age=0.0):
        path = tmp_path / name
        path.mkdir()
        (path / "knn.memory.layer.1.memmap").write_bytes(b"\0" * 64)
        if owner is not None:
            (path / "OWNER").write_text(str(owner))
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    dead = folder("longrange-knn-dead", owner=_dead_pid())
    live = folder("longrange-knn-live", owner=os.getppid(), age=7200)
    old = folder("longrange-knn-old", age=7200)
    young = folder("longrange-knn-young")
    held = folder("longrange-knn-held", age=7200)
    other = folder("not-knn", age=7200)
    model = create_model("memorizing", "tiny", knn_memories_directory=str(tmp_path), max_knn_memories=16)
    memories = model.create_knn_memories(batch_size=1)  # a live memory of this process
    (real,) = [p for p in tmp_path.glob("longrange-knn-*") if p not in (dead, live, old, young, held)]
    os.utime(real, (time.time() - 7200, time.time() - 7200))
    lock = FileLock(str(held / ".knn.lock"))
    lock.acquire(timeout=0)
    try:
        removed = remove_stale_knn_folders([tmp_path])
    finally:
        lock.release()
    assert sorted(removed) == sorted([dead, old])
    assert all(p.is_dir() for p in (live, young, held, other, real))
    memories.cleanup()
    assert not real.exists()
