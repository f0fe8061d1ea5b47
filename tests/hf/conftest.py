"""Shared set-up of the Hugging Face tests: offline, no network, tiny models of every family.

Nothing here may reach the network: the Hugging Face libraries are put in offline mode before
they are imported, and every socket connection to a non-local address fails at once with an
error that names it (a test that tries fails, it does not hang).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from longrange.models.registry import FAMILIES, create_model  # noqa: E402

# Small windows, so that short sequences cross block / chunk / bucket boundaries (the same
# settings as tests/models/test_protocol.py).
OPTIONS = {
    "vanilla": {},
    "performer": {"chunk_size": 8, "local_attn_heads": (1,), "local_window_size": 8, "shift_tokens": True},
    "routing": {"window_size": 8, "max_seq_len": 64},
    "sinkhorn": {"bucket_size": 8, "max_seq_len": 64},
    "block_recurrent": {"block_width": 8, "max_seq_len": 64},
    "memorizing": {"max_seq_len": 8, "xl_max_memories": 4, "num_retrieved_memories": 4},
}


def pytest_generate_tests(metafunc):
    """A test that takes ``family`` runs once per family."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny model of ``family`` in eval mode, its matrices drawn wider than at
    initialisation so that greedy decoding does not repeat one byte."""
    torch.manual_seed(seed)
    model = create_model(family, "tiny", **{**OPTIONS[family], **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
        out = model.forward_lm(torch.randint(0, 256, (2, 8)))  # lazy initialisation (k-means)
        if out.state is not None:
            out.state.close()
    return model


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"a test tried to reach the network ({address}); the HF tests run offline")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield


@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture
def fresh():
    """A tiny model of a family as initialised (for training)."""

    def make(family: str):
        torch.manual_seed(0)
        return create_model(family, "tiny", **OPTIONS[family])

    return make


@pytest.fixture
def saved_lr(tmp_path: Path):
    """Make a tiny model of a family and save it as a longrange model directory."""

    def make(family: str, **overrides):
        model = tiny_model(family, **overrides)
        directory = tmp_path / f"lr-{family}"
        model.save_pretrained(directory)
        return model, directory

    return make
