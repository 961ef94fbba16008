"""Phases of a step named and timed by one context manager (verl's `marked_timer`), and its peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def marked_timer(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Add the seconds the block takes to `timings[name]` (a phase run twice, say in two dynamic-sampling
    rounds, adds up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def peak_memory_mb() -> float:
    """The peak memory so far: the GPU's allocations, or this process's resident set on a CPU run."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
