"""Rewards that vary on a random tiny model's output, so tiny runs have non-zero advantages."""

from __future__ import annotations

from typing import Any


def text_of(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def length_mod_three(completions: list[Any], **_: Any) -> list[float]:
    return [float(len(text_of(c)) % 3) for c in completions]
