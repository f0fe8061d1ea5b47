"""Shared fixtures: a small text corpus on disk, a deterministic torch set-up, and a check
that no kNN memory file outlives a test."""

from __future__ import annotations

import gc
import random
import tempfile
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


@pytest.fixture
def no_knn_files_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Temporary files go under a root of the test's own (so memories made by other processes
    on the machine cannot be mistaken for ones this test leaked), and no kNN memory file may
    remain there once the test's objects are collected."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield
    gc.collect()
    assert not list(root.glob("longrange-knn-*")), "kNN memory files were left behind"
