"""Held-out evaluation: sample each held-out prompt, score it with the recipe's rewards, summarise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rft.data import Example
from rft.rollout.base import RolloutEngine, SamplingSettings
from rft.scoring import RewardScorer


@dataclass
class EvalResult:
    label: str
    mean: float
    stderr: float
    count: int
    rewards: list[float]
    per_function: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "mean": self.mean, "stderr": self.stderr, "count": self.count,
            "per_function": self.per_function,
        }


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def decode_completions(tokenizer: Any, examples: list[Example], completion_ids: list[list[int]], n: int) -> list[Any]:
    """Completion texts; for chat prompts, TRL's form: [{"role": "assistant", "content": text}]."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions: list[Any] = []
    for i, text in enumerate(texts):
        completions.append([{"role": "assistant", "content": text}] if examples[i // n].is_chat else text)
    return completions


def evaluate(
    label: str,
    engine: RolloutEngine,
    tokenizer: Any,
    examples: list[Example],
    scorer: RewardScorer,
    sampling: SamplingSettings,
    batch_size: int,
    keep_samples: int = 4,
) -> EvalResult:
    """One completion per held-out prompt (greedy or sampled, as `sampling` says), scored and summarised."""
    rewards: list[float] = []
    per_function_values: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rollout = engine.generate([e.prompt_ids for e in chunk], 1, sampling)
        completions = decode_completions(tokenizer, chunk, rollout.completion_ids, 1)
        scores = scorer.score([e.prompt for e in chunk], completions, rollout.completion_ids, [e.row for e in chunk])
        rewards.extend(scores.total)
        for name, values in scores.per_function.items():
            per_function_values.setdefault(name, []).extend(v for v in values if v is not None)
        for example, completion, reward in zip(chunk, completions, scores.total, strict=True):
            if len(samples) < keep_samples:
                samples.append({"prompt": example.prompt, "completion": completion, "reward": reward})
    mean, stderr = mean_and_stderr(rewards)
    per_function = {name: sum(v) / len(v) for name, v in per_function_values.items() if v}
    return EvalResult(label, mean, stderr, len(rewards), rewards, per_function, samples)
