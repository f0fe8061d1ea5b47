"""Shared fixtures: a small text corpus on disk and a deterministic torch set-up."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    yield


def _fake_source(i: int) -> str:
    lines = [f"def function_{i}_{j}(x, y={j}):\n    return x * {j} + y  # note {i}\n" for j in range(40)]
    return f'"""Module {i}."""\n\nimport os\n\n' + "\n".join(lines)


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of 12 small Python-like files (about 30 KB)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"mod_{i:02d}.py").write_text(_fake_source(i))
    return root
