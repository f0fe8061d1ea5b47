"""transformers' Trainer trains a longrange model; activation (gradient) checkpointing is
refused clearly and bf16 runs."""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")
pytest.importorskip(
    "accelerate", reason="accelerate is not installed (the Trainer needs it: pip install 'longrange[hf]')"
)

from transformers import Trainer, TrainingArguments, default_data_collator

import longrange.hf as lh
from longrange.data.tokenizer import ByteTokenizer
from longrange.models.registry import create_model


def rows(length: int) -> list[dict]:
    """A tiny in-memory dataset: rows of a repetitive text, labels = inputs (shifted inside)."""
    text = "".join(f"def f{i % 7}(x):\n    return x * {i % 7}\n" for i in range(60))
    ids = ByteTokenizer().encode(text)
    ids = ids[: len(ids) // length * length].view(-1, length)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": 25,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return TrainingArguments(**{**settings, **overrides})


def mean_loss(model, data) -> float:
    batch = default_data_collator(data[:8])
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_trainer_lowers_the_loss(family, fresh, tmp_path):
    lr = fresh(family)
    model = lh.wrap(lr)
    data = rows(min(32, lr.config.max_seq_len))
    before = mean_loss(model, data)
    Trainer(
        model=model, args=arguments(tmp_path), train_dataset=data, data_collator=default_data_collator
    ).train()
    after = mean_loss(model, data)
    assert after < before - 0.5, (before, after)


def test_gradient_checkpointing_is_refused(tmp_path):
    model = lh.wrap(create_model("vanilla", "tiny"))
    data = rows(32)
    args = arguments(tmp_path, max_steps=2, activation_checkpointing=True)
    with pytest.raises(ValueError, match="does not support activation \\(gradient\\) checkpointing"):
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()


def test_bf16_runs(family, fresh, tmp_path):
    """The Trainer's bf16 (autocast) trains every family (the Performer's and block_recurrent's
    backward passes failed on mixed dtypes under it before)."""
    lr = fresh(family)
    model = lh.wrap(lr)
    data = rows(min(32, lr.config.max_seq_len))
    args = arguments(tmp_path, max_steps=3, bf16=True)
    result = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_resuming_from_a_checkpoint_loads_its_weights(tmp_path):
    """A checkpoint holds the weights under longrange's names (no ``model.`` prefix); resuming
    from it loaded none of them before (only warnings), so training went on from a fresh model."""
    data = rows(32)
    args = arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    whole = lh.wrap(create_model("vanilla", "tiny"))
    Trainer(model=whole, args=args, train_dataset=data, data_collator=default_data_collator).train()
    torch.manual_seed(1)  # another start: only the checkpoint's weights can make the runs agree
    resumed = lh.wrap(create_model("vanilla", "tiny"))
    Trainer(model=resumed, args=args, train_dataset=data, data_collator=default_data_collator).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2")
    )
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # The same names by hand, strictly: the tied head is filled from the embedding it shares.
    fresh = lh.wrap(create_model("vanilla", "tiny"))
    fresh.load_state_dict(whole.longrange.weights_for_saving())
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), fresh.parameters(), strict=True))
