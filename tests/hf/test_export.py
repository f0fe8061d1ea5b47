"""``longrange export-hf`` / ``import-hf``: the directory conversions and their commands."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")

from transformers import AutoModelForCausalLM, AutoTokenizer

import longrange.hf as lh
from longrange.cli import main
from longrange.models.base import LongRangeLM


def test_export_writes_a_directory_transformers_loads(saved_lr, tmp_path):
    model, lr_dir = saved_lr("vanilla")
    out = tmp_path / "hf"
    lh.export_hf(lr_dir, out)
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer_config.json",
    }
    assert isinstance(AutoTokenizer.from_pretrained(out), lh.LongRangeByteTokenizer)
    seq = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=seq).logits, model(seq))
    with pytest.raises(ValueError, match="already holds a model"):
        lh.export_hf(lr_dir, out)
    lh.export_hf(lr_dir, out, overwrite=True)


def test_import_refuses_a_foreign_directory(tmp_path):
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a longrange family"):
        lh.import_hf(foreign, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        lh.import_hf(tmp_path / "missing", tmp_path / "out")


def test_export_and_import_commands(saved_lr, tmp_path, capsys):
    model, lr_dir = saved_lr("vanilla")
    assert main(["export-hf", str(lr_dir), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    seq = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(LongRangeLM.from_pretrained(tmp_path / "back").eval()(seq), model(seq))
    capsys.readouterr()
    assert main(["export-hf", str(lr_dir), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longrange export-hf: error:") and "overwrite" in err and len(err.splitlines()) == 1
    assert main(["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert main(["export-hf", str(lr_dir), str(tmp_path / "hf"), "--overwrite"]) == 0


def test_import_refuses_unreadable_or_misshapen_weights(saved_lr, tmp_path, capsys):
    # A corrupt weights file (SafetensorError) and weights the edited config does not fit
    # (transformers' RuntimeError) ended the command with a traceback.
    _, lr_dir = saved_lr("vanilla")
    lh.export_hf(lr_dir, tmp_path / "hf")
    corrupt, misshapen = tmp_path / "corrupt", tmp_path / "misshapen"
    for target in (corrupt, misshapen):
        shutil.copytree(tmp_path / "hf", target)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((misshapen / "config.json").read_text())
    (misshapen / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(ValueError, match="corrupt or unreadable weights file"):
        lh.import_hf(corrupt, tmp_path / "out")
    with pytest.raises(ValueError, match=r"do not have the shapes its config\.json gives"):
        lh.from_pretrained(misshapen)
    capsys.readouterr()
    for source in (corrupt, misshapen):
        assert main(["import-hf", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err  # after transformers' progress bar and load report
        assert err.splitlines()[-1].startswith("longrange import-hf: error:") and "Traceback" not in err
