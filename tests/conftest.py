"""Shared fixtures: a small text corpus on disk, a deterministic torch set-up, a check that
no kNN memory file outlives a test, and torch's own CPU allocator back after every test (the
CLI commands tests call in this process put the allocation cache in place)."""

from __future__ import annotations

import gc
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_build_cache(tmp_path_factory):
    """The CPU allocation cache is built into a folder of this session's, not the user's."""
    os.environ["LONGRANGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("longrange-cache"))
    yield


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    yield
    from longrange import cpu_cache

    if cpu_cache.enabled():
        cpu_cache.disable()


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
def train_cli(tmp_path: Path, text_folder: Path):
    """``longrange train`` in this process: the tiny preset at 32 tokens on ``text_folder``, 3
    steps, into ``tmp_path/runs/cli``; the flags given are appended (a repeated one wins).
    Returns the exit code."""
    from longrange.cli import main

    def run(*extra: str) -> int:
        args = ["train", "--preset", "tiny", "--set", "max_seq_len=32", "--data", str(text_folder)]
        args += ["--steps", "3", "--batch-size", "2", "--eval-every", "3", "--eval-tokens", "128"]
        args += ["--out", str(tmp_path / "runs"), "--name", "cli", "--no-progress", "--device", "cpu"]
        return main([*args, *extra])

    return run


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


@pytest.fixture
def denormal_switch():
    """``longrange.ops.numerics``, whose denormal mode the test checks; skips where its helper
    cannot be built here (no compiler, not Linux, not x86)."""
    from longrange.ops import numerics

    reason = numerics.flush_available()
    if reason is not None:
        pytest.skip(f"denormal mode: {reason}")
    return numerics
