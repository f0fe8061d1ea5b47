import json
import math
import os
import subprocess
import sys

import pytest

from longrange.atomic import atomic_write_json
from longrange.data.corpus import load_corpus
from longrange.train.config import TrainConfig
from longrange.train.trainer import Trainer, lr_at, make_optimizer

TINY = {"max_seq_len": 64, "dropout": 0.1}


def _cfg(tmp_path, **overrides):
    base = dict(
        model="vanilla",
        preset="tiny",
        set=TINY,
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
        sample_tokens=16,
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_run_folder_contents_and_learning(tmp_path, text_folder):
    corpus = load_corpus(text_folder)
    result = Trainer(_cfg(tmp_path, steps=30, eval_every=30, lr=1e-2), corpus=corpus).fit()
    run = tmp_path / "runs" / "t"
    for name in (
        "config.json",
        "model.safetensors",
        "checkpoints/latest.json",
        "checkpoints/step-000030/trainer_state.json",
        "checkpoints/step-000030/trainer_state.safetensors",
        "checkpoints/step-000030/rank-0.json",
        "checkpoints/step-000030/model.safetensors",
        "train_config.json",
        "metrics.jsonl",
        "loss.png",
        "sample.txt",
        "best/model.safetensors",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_bpb" in records[0]
    logged = [r for r in records if "train_loss" in r]
    assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(logged[0])
    assert result["val_bpb_after"] < result["val_bpb_before"] - 1.0
    assert (run / "sample.txt").read_text().startswith("def ")


def test_validation_follows_eval_every_whatever_the_logging_interval(tmp_path, text_folder):
    # The CLI sets --eval-every but not log_every (10): a validation every 3 steps must not
    # wait for a step that both divide.
    Trainer(_cfg(tmp_path, steps=7, eval_every=3, log_every=10), corpus=load_corpus(text_folder)).fit()
    lines = (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 3, 6, 7]
    assert all("train_loss" in r for r in records if r["step"] > 0)


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55, abs=0.01)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))
    assert math.isfinite(lr_at(0, TrainConfig(warmup=0)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"precision": "fp8"}, "precision"),
        ({"seq_len": 1}, "seq_len"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**64}, "seed must be an integer in"),
        ({"name": "a/b"}, "name must be a folder name"),
        ({"name": ""}, "name must be a folder name"),
        ({"name": ".."}, "name must be a folder name"),
        ({"eval_tokens": 0}, "eval_tokens must be a positive integer"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"max_nonfinite_steps": 0}, "max_nonfinite_steps"),
        ({"grad_clip": float("inf")}, "grad_clip"),
    ],
    ids=[
        "steps",
        "lr",
        "precision",
        "seq_len",
        "seed-negative",
        "seed-huge",
        "name-path",
        "name-empty",
        "name-dotdot",
        "eval_tokens",
        "lr-nan",
        "max_nonfinite_steps",
        "grad_clip",
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_two_process_gloo_ddp(tmp_path, text_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "longrange.cli",
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_seq_len=32",
        "--data",
        str(text_folder),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--eval-every",
        "4",
        "--eval-tokens",
        "256",
        "--save-every",
        "4",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "ddp",
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    assert (run / "model.safetensors").is_file()
    assert proc.stdout.count("longrange train: done") == 1  # only rank 0 reports
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 4


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777


def test_a_saved_run_config_with_tuple_settings_builds_the_same_model(tmp_path, text_folder):
    # --set memorizing_layers=1 gives a tuple; train_config.json hands it back as a list
    cfg = _cfg(tmp_path, model="memorizing", set={"memorizing_layers": (1,), "max_seq_len": 32})
    reread = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert reread.set["memorizing_layers"] == [1]
    trainer = Trainer(reread, corpus=load_corpus(text_folder))
    assert trainer.model.config.memorizing_layers == (1,)
    trainer.state.close()


def test_weight_decay_spares_per_head_scalars_biases_and_norms(tmp_path):
    from longrange.models.registry import create_model

    model = create_model("memorizing", "tiny", knn_combine="gate")
    optimizer = make_optimizer(model, _cfg(tmp_path, weight_decay=0.1))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    layer = model.config.knn_layer_numbers[0] - 1
    assert f"blocks.{layer}.attn.scale" not in names  # a log-temperature [H, 1, 1]
    assert f"blocks.{layer}.attn.memory_gate" not in names
    assert not any(name.endswith("bias") or "norm" in name for name in names)
    assert f"blocks.{layer}.attn.to_out.weight" in names
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for group in optimizer.param_groups for p in group["params"]
    )


@pytest.mark.parametrize("flush", [True, False])
def test_fit_on_cpu_flushes_denormals_unless_told_not_to(
    tmp_path, text_folder, monkeypatch, flush, denormal_switch
):
    """The Python trainer runs with subnormal numbers flushed on every thread (its default, as
    ``longrange train``), or keeps them with ``flush_denormals=False``; either way the mode is
    as before once fit returns."""
    from longrange.train import trainer

    numerics = denormal_switch
    seen = []
    fit = trainer.Trainer._fit
    monkeypatch.setattr(
        trainer.Trainer, "_fit", lambda self, *a: seen.append(numerics.denormals_flushed()) or fit(self, *a)
    )
    cfg = _cfg(tmp_path, steps=2, eval_every=2, flush_denormals=flush)
    Trainer(cfg, corpus=load_corpus(text_folder)).fit()
    assert seen == [flush] and not numerics.denormals_flushed()


def test_flush_denormals_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="flush_denormals must be a bool, got int"):
        _cfg(tmp_path, flush_denormals=1)
