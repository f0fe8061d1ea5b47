"""Timing on a device: waiting for its queued work, and steps timed in turn."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def steps_in_turn(steps: list[Callable[[], object]], repeats: int, device: str = "cpu") -> list[list[float]]:
    """A warm-up call of each of ``steps``, then ``repeats`` rounds that time one call of each
    in turn, so that the machine's drift reaches them alike: the times, one list per step."""
    for step in steps:
        step()
    sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, spent in zip(steps, times):
            start = time.perf_counter()
            step()
            sync(device)
            spent.append(time.perf_counter() - start)
    return times
