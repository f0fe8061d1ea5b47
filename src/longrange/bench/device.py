"""Names and facts about the device a benchmark runs on, recorded with every figure."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def device_slug(device: str | torch.device) -> str:
    """A folder name for benchmarks/results/<slug>/, e.g. ``cpu-2c-amd-epyc-7b13``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        prefix = "cuda"
    else:
        name = cpu_name()
        prefix = f"cpu-{os.cpu_count()}c"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(processor|cpu|r|tm)(?=-|$)", "", slug)
    return f"{prefix}-{slug}"[:60]


def environment(device: str | torch.device) -> dict[str, str]:
    try:
        version = metadata.version("longrange")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "device": device_label(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "longrange": version,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }
