"""Exact resume and the checkpoint as one atomic unit (issue 17, items 1-5)."""

import copy
import json
import shutil
import uuid

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from longrange.atomic import atomic_write_json, file_digest
from longrange.data.corpus import load_corpus
from longrange.train import checkpoint as ckpt
from longrange.train.config import TrainConfig
from longrange.train.trainer import Trainer

STATELESS = ["vanilla", "performer", "routing", "sinkhorn"]


def _cfg(tmp_path, **overrides):
    base = dict(
        model="vanilla",
        preset="tiny",
        set={"max_seq_len": 64},
        seq_len=32,
        batch_size=4,
        steps=6,
        lr=3e-3,
        warmup=2,
        eval_every=3,
        eval_tokens=512,
        log_every=1,
        save_every=3,
        out=str(tmp_path / "runs"),
        name="t",
        sample_tokens=8,
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _metrics(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("tokens_per_s", None)  # a timing, the one field that may differ
    return records


def assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)}/{len(wa)} tensors differ, e.g. {differ[:3]}"
    assert _metrics(a) == _metrics(b)


def _cut_and_resume(tmp_path, corpus, stop_after, **overrides):
    full = Trainer(_cfg(tmp_path, name="full", **overrides), corpus=corpus)
    full.fit()
    Trainer(_cfg(tmp_path, name="cut", **overrides), corpus=corpus).fit(stop_after=stop_after)
    run = tmp_path / "runs" / "cut"
    Trainer(_cfg(tmp_path, name="cut", **overrides), resume=str(run), corpus=corpus).fit()
    return tmp_path / "runs" / "full", run


SETTINGS = {"memorizing": {"max_seq_len": 32, "max_knn_memories": 64}, "block_recurrent": {"max_seq_len": 32}}


@pytest.mark.parametrize("family", [*STATELESS, "block_recurrent", "memorizing"])
def test_resume_is_exact(tmp_path, text_folder, family):
    # Killed at step 4, one step after the checkpoint of step 3: the resumed run redoes step 4.
    settings = SETTINGS.get(family, {"max_seq_len": 64})
    full, cut = _cut_and_resume(tmp_path, load_corpus(text_folder), 4, model=family, set=settings)
    assert_same_run(full, cut)
    steps = [r["step"] for r in _metrics(cut)]
    assert steps == sorted(set(steps))


def _fake_state_methods(monkeypatch, cls):
    """save_state / load_state as the models will have them, keeping the state in memory
    behind a key file (the trainer's side is what is under test)."""
    kept, calls = {}, []

    def save_state(self, state, directory):
        assert directory.is_dir() and not any(directory.iterdir())
        key = uuid.uuid4().hex
        kept[key] = copy.deepcopy(state)
        (directory / "state.json").write_text(json.dumps({"key": key}))
        calls.append(("save", directory))

    def load_state(self, directory, *, batch_size, device):
        calls.append(("load", directory, batch_size))
        return copy.deepcopy(kept[json.loads((directory / "state.json").read_text())["key"]])

    monkeypatch.setattr(cls, "save_state", save_state, raising=False)
    monkeypatch.setattr(cls, "load_state", load_state, raising=False)
    return calls


def test_carried_state_lives_in_the_checkpoint_and_comes_back(tmp_path, text_folder, monkeypatch):
    from longrange.models.registry import get_family

    calls = _fake_state_methods(monkeypatch, get_family("block_recurrent").model_class)
    full, cut = _cut_and_resume(
        tmp_path, load_corpus(text_folder), 4, model="block_recurrent", set={"max_seq_len": 32}
    )
    assert_same_run(full, cut)
    pointer = json.loads((cut / "checkpoints" / "latest.json").read_text())
    assert "state-0/state.json" in pointer["files"]
    assert (cut / "checkpoints" / "step-000006" / "state-0" / "state.json").is_file()
    loads = [c for c in calls if c[0] == "load"]
    assert len(loads) == 1 and loads[0][1].name == "state-0" and loads[0][2] == 4
    assert loads[0][1].parent.name == "step-000003"  # read from the published folder


def test_a_checkpoint_saved_before_the_first_validation_resumes(tmp_path, text_folder):
    # best_bpb is still unknown (null) in the checkpoint of step 3.
    full, cut = _cut_and_resume(tmp_path, load_corpus(text_folder), 3, eval_every=6)
    state = json.loads((cut / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["best_bpb"] is not None
    assert_same_run(full, cut)


def test_checkpoint_layout_and_pruning(tmp_path, text_folder):
    Trainer(_cfg(tmp_path), corpus=load_corpus(text_folder)).fit()
    run = tmp_path / "runs" / "t"
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-000006"]
    pointer = json.loads((root / "latest.json").read_text())
    assert pointer["step"] == 6 and pointer["folder"] == "step-000006" and pointer["world_size"] == 1
    folder = root / "step-000006"
    assert set(pointer["files"]) == {p.name for p in folder.iterdir()}
    for name, digest in pointer["files"].items():
        assert file_digest(folder / name) == digest
    # the top level is the latest checkpoint's weights, for from_pretrained / generate / eval
    assert (run / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (run / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_a_kill_inside_a_checkpoint_leaves_the_previous_one(tmp_path, text_folder, monkeypatch):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, name="full"), corpus=corpus).fit()
    real = ckpt.write_shared_files

    def killed_half_way(staging, **kwargs):
        real(staging, **kwargs)
        if kwargs["step"] == 6:
            raise KeyboardInterrupt  # the process dies after the weights, before the rename

    monkeypatch.setattr("longrange.train.resume.write_shared_files", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(tmp_path, name="cut"), corpus=corpus).fit()
    monkeypatch.undo()
    run = tmp_path / "runs" / "cut"
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert (run / "checkpoints" / "step-000006.tmp").is_dir()  # what the kill left
    Trainer(_cfg(tmp_path, name="cut"), resume=str(run), corpus=corpus).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-000006"]
    assert_same_run(tmp_path / "runs" / "full", run)


def _rewrite_pointer(root):
    pointer = json.loads((root / "latest.json").read_text())
    folder = root / pointer["folder"]
    pointer["files"] = {name: file_digest(folder / name) for name in pointer["files"]}
    atomic_write_json(root / "latest.json", pointer)


def test_a_checkpoint_whose_files_disagree_is_refused(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, name="a", steps=3), corpus=corpus).fit()
    Trainer(_cfg(tmp_path, name="b", steps=6), corpus=corpus).fit()
    run = tmp_path / "runs" / "b"
    root = run / "checkpoints"
    before = (run / "train_config.json").read_bytes()
    # step-3 trainer state beside step-6 weights, with a pointer that lists them faithfully
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        data = (tmp_path / "runs" / "a" / "checkpoints" / "step-000003" / name).read_bytes()
        (root / "step-000006" / name).write_bytes(data)
    _rewrite_pointer(root)
    with pytest.raises(ValueError, match=r"do not agree.*trainer_state\.json is from step 3"):
        Trainer(_cfg(tmp_path, name="b", steps=9), resume=str(run), corpus=corpus)
    # a file changed after the pointer was written
    (root / "step-000006" / "rank-0.json").write_text("{}")
    with pytest.raises(ValueError, match=r"rank-0.json does not match latest.json \(size differs\)"):
        Trainer(_cfg(tmp_path, name="b", steps=9), resume=str(run), corpus=corpus)
    (root / "step-000006" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"incomplete: model\.safetensors is missing"):
        Trainer(_cfg(tmp_path, name="b", steps=9), resume=str(run), corpus=corpus)
    assert (run / "train_config.json").read_bytes() == before


def test_resume_refuses_options_that_change_the_run(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    run = tmp_path / "runs" / "t"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="keeps its seq_len, batch_size"):
        Trainer(_cfg(tmp_path, steps=6, batch_size=2, seq_len=16), resume=str(run), corpus=corpus)
    with pytest.raises(ValueError, match="steps 2 is below the run's current step 3"):
        Trainer(_cfg(tmp_path, steps=2), resume=str(run), corpus=corpus)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # the safe ones apply, and the run remembers them
    Trainer(_cfg(tmp_path, steps=5, lr=1e-3, eval_every=5), resume=str(run), corpus=corpus).fit()
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["steps"], saved["lr"], saved["eval_every"]) == (5, 1e-3, 5)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 5


def test_a_second_process_on_the_run_folder_is_refused(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    run = tmp_path / "runs" / "t"
    metrics = (run / "metrics.jsonl").read_bytes()
    other = FileLock(str(run / ".lock"))  # what the first process holds while it trains
    other.acquire(timeout=0)
    try:
        second = Trainer(_cfg(tmp_path, steps=6), resume=str(run), corpus=corpus)
        with pytest.raises(ValueError, match="is in use by another longrange process"):
            second.fit()
    finally:
        other.release()
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3


def test_corrupt_checkpoint_files_are_refused(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    run = tmp_path / "runs" / "t"
    root = run / "checkpoints"
    (root / "step-000003" / "trainer_state.safetensors").write_bytes(b"\x00" * 10)
    _rewrite_pointer(root)  # damaged before the pointer was written: the checksums agree
    with pytest.raises(ValueError, match="corrupt trainer state"):
        Trainer(_cfg(tmp_path, steps=6), resume=str(run), corpus=corpus)
    (root / "latest.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match="corrupt checkpoint pointer"):
        Trainer(_cfg(tmp_path, steps=6), resume=str(run), corpus=corpus)
    (root / "latest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Trainer(_cfg(tmp_path, steps=6), resume=str(run), corpus=corpus)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("files", [], "files must map each file's path to its size and sha256"),
        ("files", {"config.json": "x"}, "files must map each file's path to its size and sha256"),
        ("step", None, "step must be an integer >= 0"),
        ("step", "3", "step must be an integer >= 0"),
        ("world_size", 0, "world_size an integer >= 1"),
        ("folder", 3, "folder must be a folder name"),
        ("folder", "../checkpoints/step-000003", "which is missing or misnamed"),
    ],
)
def test_a_pointer_with_fields_of_the_wrong_type_is_refused_clearly(
    tmp_path, text_folder, field, value, message
):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    root = tmp_path / "runs" / "t" / "checkpoints"
    pointer = json.loads((root / "latest.json").read_text())
    atomic_write_json(root / "latest.json", {**pointer, field: value})
    with pytest.raises(ValueError, match=message):
        Trainer(_cfg(tmp_path, steps=6), resume=str(tmp_path / "runs" / "t"), corpus=corpus)


def test_run_options_that_are_not_an_object_are_refused_clearly(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    (tmp_path / "runs" / "t" / "train_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"corrupt trainer options .*train_config\.json"):
        Trainer(_cfg(tmp_path, steps=6), resume=str(tmp_path / "runs" / "t"), corpus=corpus)


def test_a_checkpoint_of_another_family_is_refused(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, name="v", steps=3), corpus=corpus).fit()
    Trainer(_cfg(tmp_path, name="p", model="performer", steps=3), corpus=corpus).fit()
    run = tmp_path / "runs" / "v"
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(tmp_path / "runs" / "p" / "checkpoints", run / "checkpoints")
    with pytest.raises(ValueError, match="holds a 'performer' model but the run trains 'vanilla'"):
        Trainer(_cfg(tmp_path, name="v", steps=6), resume=str(run), corpus=corpus)


def test_a_misshapen_optimizer_state_is_refused_clearly(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    Trainer(_cfg(tmp_path, steps=3), corpus=corpus).fit()
    root = tmp_path / "runs" / "t" / "checkpoints"
    path = root / "step-000003" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "optimizer": {"state": []}}))
    _rewrite_pointer(root)  # damaged before the pointer was written: the checksums agree
    with pytest.raises(ValueError, match=r"corrupt trainer state .*misshapen optimizer state"):
        Trainer(_cfg(tmp_path, steps=6), resume=str(tmp_path / "runs" / "t"), corpus=corpus)
