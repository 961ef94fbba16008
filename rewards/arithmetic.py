"""Reward for short arithmetic answers: 1 when the last number in the completion is the answer."""

from __future__ import annotations

import re
from typing import Any

from rewards.base import completion_text

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number_correct(completions: list[Any], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion's last number equals `answer`, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        numbers = _NUMBER.findall(completion_text(completion).replace(",", ""))
        rewards.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return rewards
