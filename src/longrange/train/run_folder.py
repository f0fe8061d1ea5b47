"""The run folder: checked before any work, made in one step, locked while a process trains.

A new run's folder is made only after everything was checked (options, model config, data,
the first validation), so a refused run leaves nothing behind. Two runs asking for the same
name race for it with an exclusive mkdir; the loser takes the next free ``NAME-2``, ...
The lock (``<run>/.lock``, a filelock) is held for the whole run, so a second process on the
same folder (two resumes at once) stops with a one-line error instead of interleaving
metrics and checkpoints. File-system failures become OSErrors that name the path and say
what was being done.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".lock"


def failure(err: OSError, doing: str, path: Path | str | None = None) -> OSError:
    """``err`` as an OSError whose text says what was being done; the path is kept."""
    filename = err.filename if err.filename is not None else (str(path) if path is not None else None)
    return OSError(err.errno, f"{doing}: {err.strerror or err}", filename)


def check_out_folder(out: str) -> None:
    """Refuse an --out that cannot hold run folders before any work."""
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder")
            break


def next_free_run_dir(out: str, name: str) -> Path:
    base = Path(out) / name
    if not base.exists():
        return base
    i = 2
    while (Path(out) / f"{name}-{i}").exists():
        i += 1
    return Path(out) / f"{name}-{i}"


def create_run_dir(out: str, name: str) -> Path:
    """Make ``out/name`` (or the next free ``name-N``) with an exclusive mkdir."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise failure(err, "cannot create the --out folder", out) from None
    while True:
        path = next_free_run_dir(out, name)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # another run took the name between the check and the mkdir
        except OSError as err:
            raise failure(err, "cannot create the run folder", path) from None


class RunLock:
    """The run folder's lock; :meth:`acquire` fails at once when another process holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._lock = FileLock(str(self.path))

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(
                f"{self.run_dir} is in use by another longrange process (it holds {self.path}); "
                "wait for it to end or stop it, then resume"
            ) from None
        except OSError as err:
            raise failure(err, "cannot lock the run folder (is it writable?)", self.path) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
