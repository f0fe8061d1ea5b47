"""Reading a process's memory: the resident set, its high-water mark (resettable), a cap on
the address space for child processes that might outgrow the machine, and the one way the
benchmarks run such a child (:func:`run_child`).

``bench/speed.py`` measures each point's peak in a fresh process with these: on CPU the growth
of the high-water mark (VmHWM, reset just before the step), so a point's allocations cannot
hide behind another's or behind imports and model construction.
"""

from __future__ import annotations

import os
import resource
import runpy
import subprocess
import sys

# Tells a child of run_child whether the parent serves torch's CPU blocks from the allocation
# cache (longrange.cpu_cache), so both sides of a comparison run the same way.
CACHE_ENV = "LONGRANGE_CHILD_CPU_CACHE"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_kib() -> int:
    value = _status_kib("VmRSS")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    # Linux resets the high-water mark (VmHWM) when "5" is written to clear_refs, so the peak
    # read afterwards belongs to this measurement, not to imports or model construction.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_kib() -> int:
    value = _status_kib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cap_address_space() -> None:
    """Child-process hook for the reference packages on CPU: cap the address space at 80% of
    the machine's memory, so a reference that outgrows it (the Performer reference's causal
    path wants 22 GB at 8K) fails with an allocation error instead of pushing the machine
    into the kernel's out-of-memory killer."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = int(0.8 * total)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_child(
    module: str, args: list[str], *, capped: bool = False, env: dict[str, str] | None = None
) -> tuple[str | None, str]:
    """Run ``python -m module args`` (under :func:`cap_address_space` when ``capped``, with
    the CPU allocation cache when this process has it) and return (the last line it printed,
    "") when it exits 0 having printed one, else (None, why: the signal that killed it, or
    the last line of its stderr)."""
    from longrange import cpu_cache

    env = {**(os.environ if env is None else env), CACHE_ENV: "1" if cpu_cache.enabled() else "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "longrange.bench.memory", module, *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=cap_address_space if capped else None,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return lines[-1], ""
    if proc.returncode < 0:
        return None, f"killed by signal {-proc.returncode} (out of memory?)"
    return None, (proc.stderr.strip().splitlines() or ["failed"])[-1]


if __name__ == "__main__":
    # The runner of run_child: the parent's CPU cache setting, then ``module`` as __main__.
    if os.environ.get(CACHE_ENV) == "1":
        from longrange import cpu_cache

        cpu_cache.enable()
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
