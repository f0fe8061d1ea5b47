"""Corpora: the built-in one (Python's own standard library), text files, folders, JSON lines.

Every corpus is a list of documents split into train and validation by a stable hash of each
document's name, and kept in a fixed order (sorted by name), so two runs on the same machine
see exactly the same data.

The built-in corpus is every ``.py`` file under the running interpreter's standard library,
one document each, except test suites (``test``, ``tests``, ``idle_test`` folders),
``site-packages`` / ``dist-packages`` and ``__pycache__``. About 10 MB on Python 3.11.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".html", ".tex", ".csv"})


@dataclass
class Document:
    name: str
    tokens: np.ndarray  # uint8 [N]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Corpus:
    name: str
    train: list[Document]
    val: list[Document]

    def train_stream(self) -> np.ndarray:
        """All training documents concatenated in order (for random-window sampling)."""
        if not self.train:
            return np.zeros(0, dtype=np.uint8)
        return np.concatenate([d.tokens for d in self.train])

    def validation_problem(self) -> str | None:
        """Why validation would have no tokens to predict, or None when it has some."""
        if not self.val:
            total = len(self.train)
            return (
                f"{self.name} holds {total} document{'s' if total != 1 else ''} and none is held out for "
                "validation (a folder or .jsonl needs at least 2 documents; a text file keeps its last 5%)"
            )
        if all(len(d) < 2 for d in self.val):
            names = ", ".join(d.name for d in self.val[:3])
            return f"the validation documents of {self.name} ({names}) hold fewer than 2 bytes each"
        return None

    def summary(self) -> str:
        ntr, nva = sum(map(len, self.train)), sum(map(len, self.val))
        return (
            f"{self.name}: {len(self.train)} train documents ({ntr / 1e6:.2f} MB), "
            f"{len(self.val)} validation documents ({nva / 1e6:.2f} MB)"
        )


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable split: the first 8 hex digits of SHA-1 of the name, as a fraction of 16**8."""
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 16**8 < val_fraction


def _split(name: str, docs: list[Document], val_fraction: float) -> Corpus:
    docs = sorted(docs, key=lambda d: d.name)
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if not val and len(train) > 1:
        # Tiny corpora: make sure something is held out.
        val, train = train[-1:], train[:-1]
    return Corpus(name, train, val)


def _read(path: Path) -> np.ndarray:
    try:
        return np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as err:
        raise OSError(err.errno, f"cannot read --data file: {err.strerror or err}", str(path)) from None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_corpus(val_fraction: float = 0.05) -> Corpus:
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_PARTS for part in rel.parts):
            continue
        tokens = _read(path)
        if len(tokens):
            docs.append(Document(rel.as_posix(), tokens))
    if not docs:
        raise FileNotFoundError(f"no Python source files under {root}: cannot build the built-in corpus")
    return _split(f"python-stdlib ({root})", docs, val_fraction)


def _looks_binary(data: np.ndarray) -> bool:
    """Text never holds a NUL byte; executables, images and archives do, early on."""
    return bool((data[:8192] == 0).any())


def folder_corpus(root: Path, val_fraction: float) -> Corpus:
    try:
        with os.scandir(root):
            pass  # rglob skips folders it cannot read; say so for the top one
    except OSError as err:
        raise OSError(err.errno, f"cannot read --data folder: {err.strerror or err}", str(root)) from None
    docs = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if path.suffix and path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        tokens = _read(path)
        if len(tokens) and not _looks_binary(tokens):
            docs.append(Document(rel.as_posix(), tokens))
    if not docs:
        raise ValueError(f"--data folder {root} holds no text files")
    return _split(str(root), docs, val_fraction)


def jsonl_corpus(path: Path, val_fraction: float) -> Corpus:
    docs = []
    try:
        handle = path.open("rb")
    except OSError as err:
        raise OSError(err.errno, f"cannot read --data file: {err.strerror or err}", str(path)) from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 "
                    f"(byte 0x{line[err.start]:02x} at column {err.start + 1})"
                ) from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: each line must be an object with a string 'text' field")
            try:
                encoded = record["text"].encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: the text holds an unpaired surrogate escape at character {err.start}"
                ) from None
            data = np.frombuffer(encoded, dtype=np.uint8)
            docs.append(Document(f"{lineno:09d}", data))
    if not docs:
        raise ValueError(f"--data file {path} holds no documents")
    return _split(str(path), docs, val_fraction)


def text_file_corpus(path: Path, val_fraction: float) -> Corpus:
    """One text file: the last ``val_fraction`` of its bytes is the validation document."""
    data = _read(path)
    if _looks_binary(data):
        raise ValueError(
            f"--data file {path} looks binary (it holds NUL bytes), not text; give a text file, "
            "a folder of text files or a .jsonl file"
        )
    if len(data) < 16:
        raise ValueError(f"--data file {path} is too small to split into train and validation")
    cut = int(len(data) * (1 - val_fraction))
    return Corpus(str(path), [Document(path.name, data[:cut])], [Document(path.name + ":val", data[cut:])])


def load_corpus(spec: str | Path | None = None, *, val_fraction: float = 0.05) -> Corpus:
    """``None`` or "builtin": the standard-library corpus; a folder; a ``.jsonl`` file with a
    "text" field per line; any other file: plain text."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if spec is None or str(spec) == "builtin":
        return builtin_corpus(val_fraction)
    path = Path(spec)
    if path.is_dir():
        return folder_corpus(path, val_fraction)
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec}: no such file or folder (or use 'builtin')")
    if path.suffix == ".jsonl":
        return jsonl_corpus(path, val_fraction)
    return text_file_corpus(path, val_fraction)
