"""Files written whole or not at all, and read back with clear errors.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed
over the target, and the directory is fsynced after the rename, so a killed process (or a
lost power supply) leaves either the old file or the new one, never half. Readers turn a
missing or corrupt file into FileNotFoundError / ValueError naming the path.

Folders of files that must agree (a training checkpoint) are made complete under a temporary
name with :func:`write_synced` and published by one rename; see ``longrange.train.checkpoint``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _plain_mode() -> int:
    # mkstemp creates files owner-only; published files get the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def named(err: OSError, path: Path) -> OSError:
    """The same error with the path attached (a failed write() on an open file names none)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise named(err, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle, tmp)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _plain_mode())
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise named(err, path) from None
    except BaseException:
        _discard(tmp)
        raise
    fsync_directory(path.parent)


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda handle, _tmp: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_write_safetensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_synced(path: Path, data: bytes) -> None:
    """Write a new file and fsync it, without the rename: for files inside a folder that is
    itself published by one rename once complete."""
    try:
        with open(path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise named(err, path) from None


def atomic_link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` the same content as ``source`` in one rename: a hard link where the
    file system allows it (no second copy of the bytes), a copy otherwise."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src:
                write_synced(tmp, src.read())
            os.chmod(tmp, _plain_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(target.parent)


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {what}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} {path}: {err}") from None


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"corrupt {what} {path}: {err}") from None
