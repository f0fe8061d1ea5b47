"""A caching allocator for torch's CPU tensors, so long inputs do not pay the kernel for fresh
pages at every step (docs/ARCHITECTURE.md, "CPU allocation cache").

glibc hands every block above its mmap threshold (at most 32 MB) out as a fresh mapping and
unmaps it when freed, so the kernel faults in and zeroes each page of such a tensor again on
every use. At 64K tokens one activation [N, 256] is 64 MB, and a training step of the bench
models faults in 8-13 GB this way: 40% of a Sinkhorn step was kernel time. :func:`enable`
swaps torch's CPU allocator for one that keeps large freed blocks and reuses their pages,
while the memory it holds stays within the live high-water mark plus ``slack``.

The allocator is C++ (``cache.cpp``), compiled on first use against the installed torch with
the system's C++ compiler and kept in a per-user cache folder. Where that cannot happen (no
compiler, not Linux) :func:`enable` raises :class:`CacheUnavailable` saying why, and torch's
own allocator, the reference behaviour, stays in place. ``longrange train`` and ``longrange
bench`` enable it on CPU unless given ``--no-cpu-cache``.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from longrange.native import NativeUnavailable, build_library, cache_dir, compiler, load_library

__all__ = [
    "CacheUnavailable",
    "build",
    "cache_dir",
    "compiler",
    "disable",
    "enable",
    "enabled",
    "release",
    "stats",
]

SOURCE = Path(__file__).with_name("cache.cpp")
STAT_NAMES = (
    "live_bytes",
    "live_peak_bytes",
    "cached_bytes",
    "mapped_bytes",
    "mapped_peak_bytes",
    "hits",
    "split",
    "grown",
    "mapped",
    "unmapped",
)

_library: ctypes.CDLL | None = None
_enabled = False


class CacheUnavailable(NativeUnavailable):
    """The cache cannot be built or loaded here; the message says why."""


def build() -> Path:
    """The allocator's shared library for this torch and source (see
    :func:`longrange.native.build_library`); raises :class:`CacheUnavailable` when it cannot
    be built."""
    if not sys.platform.startswith("linux"):
        raise CacheUnavailable(f"needs Linux (mremap), not {sys.platform}")
    return build_library("cpu_cache", [SOURCE], error=CacheUnavailable)


def _load() -> ctypes.CDLL:
    global _library
    if _library is None:
        lib = load_library(build(), CacheUnavailable)
        lib.longrange_cache_enable.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        lib.longrange_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        _library = lib
    return _library


def enable(*, min_bytes: int = 4 << 20, slack_bytes: int = 64 << 20) -> None:
    """Serve torch's CPU blocks of at least ``min_bytes`` from the cache (smaller ones stay
    with torch's allocator: glibc serves them from its heap, and caching 1-4 MB blocks too
    made memorizing's small working set fault more); the cache may hold up to
    ``slack_bytes`` beyond the live high-water mark. Raises :class:`CacheUnavailable`
    (saying why) where the cache cannot be built here; torch's allocator then stays."""
    global _enabled
    for name, value in (("min_bytes", min_bytes), ("slack_bytes", slack_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    _load().longrange_cache_enable(min_bytes, slack_bytes)
    _enabled = True


def disable() -> None:
    """Put torch's own CPU allocator back and return the cached blocks to the system (blocks
    still in use are returned when they are freed)."""
    global _enabled
    if _library is not None:
        _library.longrange_cache_disable()
    _enabled = False


def release() -> None:
    """Return every cached (free) block to the system and restart the high-water marks."""
    if _library is not None:
        _library.longrange_cache_release()


def enabled() -> bool:
    return _enabled


def stats() -> dict[str, int]:
    """Bytes live, cached and mapped (with the high-water marks) and counts of blocks reused
    (``hits``), resized from another size (``resized``), newly mapped and unmapped; zeros
    when the cache was never enabled."""
    if _library is None:
        return dict.fromkeys(STAT_NAMES, 0)
    out = (ctypes.c_uint64 * len(STAT_NAMES))()
    _library.longrange_cache_stats(out)
    return dict(zip(STAT_NAMES, map(int, out)))
