"""Tool functions for tests/test_agent_tools.py, loaded by spec in worker processes."""

from __future__ import annotations

import os
import time


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def lookup(city: str) -> dict[str, object]:
    """Look up facts about a city.

    Args:
        city: The city's name.
    """
    return {"city": city, "population": 2_100_000, "tags": ["capital", "Seine"]}


def divide(a: float, b: float) -> float:
    """Divide one number by another.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "rested"


def hoard(megabytes: int) -> int:
    """Fill memory with a buffer of this size.

    Args:
        megabytes: The buffer's size in MiB.
    """
    return len(bytearray(megabytes * 2**20))


def worker_pid() -> int:
    """The worker process's id."""
    return os.getpid()


def untyped(a, b):  # type: ignore[no-untyped-def]
    """Add without type hints.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b
