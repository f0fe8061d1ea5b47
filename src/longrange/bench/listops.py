"""``longrange bench listops``: Long Range Arena's ListOps as sequence classification.

Every family is trained at one fixed budget on freshly generated expressions
(:func:`longrange.data.synthetic.listops`, byte tokens) and scored on held-out seeds by the
accuracy of its 10-way answer. The model reads the whole expression causally; the class comes
from :class:`SequenceClassifier`, a linear head on the model's output at the last real token.
At the LRA lengths (500-2000 characters) this is a GPU-sized run; ``--listops-length`` takes
shorter expressions for a CPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.data import synthetic
from longrange.data.tokenizer import ByteTokenizer
from longrange.models.base import LongRangeLM
from longrange.models.registry import create_model, get_family

NUM_CLASSES = 10
PAD_MULTIPLE = 128


class SequenceClassifier(nn.Module):
    """A language model with a classification head: ``forward(tokens [B, N], lengths [B])`` ->
    class logits [B, num_classes] from the model's output at position ``lengths - 1``.

    The head maps the LM's output vector to the classes; with the model's own output layer in
    front it is a linear head on the final hidden state (two linear maps compose to one), and it
    needs nothing from inside the family, so every family takes it unchanged. A causal model's
    last real position has read the whole sequence and none of the right padding.
    """

    def __init__(self, model: LongRangeLM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.model = model
        self.head = nn.Linear(model.config.vocab_size, num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        if lengths.shape != tokens.shape[:1]:
            raise ValueError(f"lengths must have shape [{tokens.shape[0]}], got {list(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > tokens.shape[1]).any()):
            raise ValueError(f"lengths must lie in [1, {tokens.shape[1]}]")
        out = self.model.forward_lm(tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last = out.logits[rows, lengths.to(tokens.device) - 1]
        return self.head(last.float()), out.aux_loss


def listops_batch(
    batch_size: int, *, seed: int, min_length: int, max_length: int, max_depth: int = 10
) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [B, N] right-padded with 0 to a multiple of 128, lengths [B], labels [B])."""
    examples = synthetic.listops(
        batch_size, min_length=min_length, max_length=max_length, max_depth=max_depth, seed=seed
    )
    tok = ByteTokenizer()
    encoded = [tok.encode(e.text) for e in examples]
    lengths = torch.tensor([len(t) for t in encoded])
    width = int(lengths.max()) + (-int(lengths.max())) % PAD_MULTIPLE
    tokens = torch.zeros(batch_size, width, dtype=torch.long)
    for i, t in enumerate(encoded):
        tokens[i, : len(t)] = t
    return tokens, lengths, torch.tensor([e.label for e in examples])


def train_listops(
    family: str,
    *,
    steps: int,
    batch_size: int = 16,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    lr: float = 1e-3,
    preset: str = "tiny",
    device: str = "cpu",
    eval_batches: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``family`` with a classification head for ``steps`` steps; held-out accuracy."""
    presets = get_family(family).presets
    preset = preset if preset in presets else next(iter(presets))
    seq_len = max_length + (-max_length) % PAD_MULTIPLE
    torch.manual_seed(seed)
    classifier = SequenceClassifier(create_model(family, preset, max_seq_len=seq_len)).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.01)
    shape = {"min_length": min_length, "max_length": max_length, "max_depth": max_depth}
    start = time.perf_counter()
    classifier.train()
    loss = torch.zeros(())
    for step in range(steps):
        tokens, lengths, labels = listops_batch(batch_size, seed=1_000_000 + step, **shape)
        logits, aux = classifier(tokens.to(device), lengths.to(device))
        loss = F.cross_entropy(logits, labels.to(device))
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
    train_s = time.perf_counter() - start
    classifier.eval()
    right = total = 0
    with torch.no_grad():
        for i in range(eval_batches):
            tokens, lengths, labels = listops_batch(batch_size, seed=i, **shape)
            logits, _ = classifier(tokens.to(device), lengths.to(device))
            right += int((logits.argmax(-1).cpu() == labels).sum())
            total += labels.numel()
    return {
        "family": family,
        "task": "listops",
        "preset": preset,
        "steps": steps,
        "batch_size": batch_size,
        "min_length": min_length,
        "max_length": max_length,
        "accuracy": right / total,
        "final_loss": loss.item(),
        "train_s": train_s,
    }
