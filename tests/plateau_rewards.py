"""Rewards for tests of early stopping and of the verl row format."""

from __future__ import annotations

from typing import Any


def constant_half(completions: list[Any], **_: Any) -> list[float]:
    """The same reward whatever the completion: a held-out plateau from the first evaluation."""
    return [0.5 for _ in completions]


def ground_truth_seen(
    completions: list[Any], reference_answer: list[Any], reward_model: list[Any], **_: Any
) -> list[float]:
    """1.0 where `reward_model.ground_truth` reached the reward both nested and as `reference_answer`."""
    return [
        float(ref == model["ground_truth"]) for ref, model in zip(reference_answer, reward_model, strict=True)
    ]
