"""Byte-level tokenizer: token i is byte i (vocabulary 256), as in the references' enwik8 runs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str | bytes) -> Tensor:
        """Text (UTF-8 encoded) or bytes -> int64 tensor [N]."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
        return torch.from_numpy(np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int64))

    def decode_bytes(self, ids: Tensor | Iterable[int]) -> bytes:
        """The exact inverse of :meth:`encode` on bytes."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if any(not 0 <= v < 256 for v in values):
            raise ValueError("byte token ids must lie in [0, 256)")
        return bytes(values)

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Text for people: invalid UTF-8 sequences become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
