"""Small C++ helpers compiled on first use against the installed torch with the system's C++
compiler, and kept in a per-user cache folder keyed by the sources, the torch version and the
compiler: the CPU allocation cache (``cpu_cache/cache.cpp``), the denormal switch of
:mod:`longrange.ops.numerics` (``ops/denormals.cpp``), the diagonal sums of the shared-head
attention's bias gradient (``ops/shared_kv/diagonal.cpp``) and the kNN inverted file's scan
(``memory/knn/cells.cpp``). Where a helper cannot be built (no compiler, not Linux)
:func:`build_library` raises the caller's error saying why, and the caller keeps torch's own
behaviour.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


class NativeUnavailable(RuntimeError):
    """A helper cannot be built or loaded here; the message says why."""


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else g++, c++ or clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def cache_dir() -> Path:
    """Where built libraries are kept: ``$LONGRANGE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/longrange`` (``~/.cache/longrange``)."""
    if os.environ.get("LONGRANGE_CACHE_DIR"):
        return Path(os.environ["LONGRANGE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longrange"


def _build_command(
    cxx: str, sources: Sequence[Path], target: Path, libraries: Sequence[str], openmp: bool
) -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # With OpenMP, at::parallel_for's inline loop runs on torch's own workers: the library
    # needs libgomp.so.1, which resolves to the copy torch has already loaded.
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", *(["-fopenmp"] if openmp else [])]
    return [
        cxx,
        *flags,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-I",
        str(root / "include"),
        *map(str, sources),
        "-o",
        str(target),
        "-L",
        str(root / "lib"),
        *(f"-l{name}" for name in libraries),
        f"-Wl,-rpath,{root / 'lib'}",
    ]


def build_library(
    name: str,
    sources: Sequence[Path],
    *,
    libraries: Sequence[str] = ("c10",),
    openmp: bool = False,
    error: type[NativeUnavailable] = NativeUnavailable,
) -> Path:
    """The shared library ``name`` built from ``sources`` for this torch, compiled once and
    reused (written under a temporary name and renamed, so a killed build leaves nothing
    half-written behind). Raises ``error`` when it cannot be built."""
    if not sys.platform.startswith("linux"):
        raise error(f"needs Linux, not {sys.platform}")
    cxx = compiler()
    if cxx is None:
        wanted = os.environ.get("CXX") or "g++, c++ or clang++"
        raise error(f"no C++ compiler found ({wanted})")
    parts = [Path(source).read_bytes() for source in sources]
    parts += [torch.__version__.encode(), cxx.encode(), " ".join([*libraries, str(openmp)]).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"{name}-{key}.so"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=folder, prefix=target.name, suffix=".part")
        os.close(fd)
    except OSError as err:
        raise error(f"cannot write to {folder}: {err.strerror or err}") from None
    try:
        command = _build_command(cxx, sources, Path(partial), libraries, openmp)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            lines = proc.stderr.splitlines()
            first = next((line for line in lines if "error" in line), lines[0] if lines else "no output")
            raise error(f"{Path(cxx).name} failed: {first[:200]}")
        os.replace(partial, target)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise error(f"building with {cxx} failed: {err}") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def load_library(path: Path, error: type[NativeUnavailable] = NativeUnavailable) -> ctypes.CDLL:
    """The built library at ``path``, loaded; raises ``error`` when it cannot be."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise error(f"cannot load the built library: {err}") from None


class OptionalLibrary:
    """A helper that has a torch fallback: built and loaded on first :meth:`load`, which
    returns None instead where it cannot be (``unavailable`` then says why, and one
    RuntimeWarning said it: "``missing`` (why); ``instead``"). ``setup`` declares the loaded
    library's functions."""

    def __init__(
        self,
        name: str,
        sources: Sequence[Path],
        *,
        missing: str,
        instead: str,
        setup: Callable[[ctypes.CDLL], None],
        openmp: bool = False,
    ) -> None:
        self.name, self.sources, self.openmp = name, list(sources), openmp
        self.missing, self.instead, self.setup = missing, instead, setup
        self.library: ctypes.CDLL | None = None
        self.unavailable: str | None = None

    def load(self) -> ctypes.CDLL | None:
        if self.library is None and self.unavailable is None:
            try:
                library = load_library(build_library(self.name, self.sources, openmp=self.openmp))
            except NativeUnavailable as err:
                self.unavailable = str(err)
                # stacklevel: past load, the module's own loader and the function that needs it
                warnings.warn(f"{self.missing} ({err}); {self.instead}", RuntimeWarning, stacklevel=4)
                return None
            self.setup(library)
            self.library = library
        return self.library
