"""Held-out evaluation: sample each held-out prompt, score it, summarise with noise, slice by metadata.

What is reported, per evaluation pass (`greedy` and/or `sampled`, `rft.eval_plans`):
- `reward`: the recipe's weighted reward; `reward/<fn>`: each reward function;
- `exact_match` (eval.exact_match), `pass@k` (eval.pass_k, sampled pass), `metric/<name>` (eval.metrics:
  evaluation-only scorers such as an LLM judge, run through the same `RewardScorer`);
- each as mean and standard error over prompts (a prompt's several samples are averaged first, so the
  error counts prompts, not correlated samples), overall and per value of every slice tag
  (`rft.eval_results`).

"Larger than its noise" is the one rule of `rft.stats`. The base model's scores come from the
baseline cache when nothing they depend on changed (`rft.baseline_cache`).

`Evaluator` holds what every pass needs (engine, trajectory sampler, held-out examples, scorers, plans,
slices), so that a caller evaluates with one call: `evaluator.run(label)` or `evaluator.baseline(config)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rft.baseline_cache import cached_baseline
from rft.config import RecipeConfig
from rft.data import Example
from rft.eval_plans import EvalPlan, check_held_out, eval_plans, tag_value
from rft.eval_results import EvalResult, summarise
from rft.reward_context import completion_text
from rft.rollout.base import RolloutEngine
from rft.sampling import SamplingSettings
from rft.scoring import RewardScorer, ScoreOutput, score_groups
from rft.stats import pass_at_k
from rft.trajectories import Sampler


def normalize_answer(text: str) -> str:
    """Exact-match normal form: trimmed, case-folded, single spaces, no final period."""
    return re.sub(r"\s+", " ", text.strip()).casefold().rstrip(".").strip()


def exact_match(expected: Any, completions: Sequence[Any]) -> float:
    """Share of `completions` whose text equals `expected` in normal form (non-strings compared as JSON)."""
    expected_text = normalize_answer(expected if isinstance(expected, str) else json.dumps(expected))
    return sum(normalize_answer(completion_text(c)) == expected_text for c in completions) / len(completions)


def _mean_present(values: Sequence[float | None]) -> float | None:
    """Mean of the values a function gave (None: not applicable), or None when it gave none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class ScoredChunk:
    """A chunk of prompts with `n` completions each, scored: completion j of prompt i is at i * n + j."""

    examples: list[Example]
    n: int
    completions: list[Any]
    scores: ScoreOutput
    metric_scores: ScoreOutput | None

    def members(self, i: int) -> range:
        return range(i * self.n, (i + 1) * self.n)


def prompt_values(chunk: ScoredChunk, i: int, plan: EvalPlan) -> dict[str, float]:
    """Prompt i's metrics over its `n` samples: reward, reward/<fn>, exact_match, pass@k, metric/<name>."""
    members, n = chunk.members(i), chunk.n
    totals = [chunk.scores.total[j] for j in members]
    values: dict[str, float] = {"reward": sum(totals) / n}
    for prefix, scores in (("reward", chunk.scores), ("metric", chunk.metric_scores)):
        for name, function_values in (scores.per_function.items() if scores is not None else ()):
            mean = _mean_present([function_values[j] for j in members])
            if mean is not None:
                values[f"{prefix}/{name}"] = mean
    if plan.exact_match is not None:
        values["exact_match"] = exact_match(
            chunk.examples[i].row[plan.exact_match], [chunk.completions[j] for j in members]
        )
    passed = sum(total >= plan.pass_threshold for total in totals)
    for k in plan.pass_k:
        values[f"pass@{k}"] = pass_at_k(n, passed, k)
    return values


@dataclass
class Evaluator:
    """Everything a held-out pass needs, gathered once; `run` evaluates every plan."""

    engine: RolloutEngine
    rollout: Sampler
    examples: list[Example]
    scorer: RewardScorer
    plans: Sequence[EvalPlan]
    slices: Sequence[str] = ()
    metric_scorer: RewardScorer | None = None

    @classmethod
    def from_recipe(
        cls, config: RecipeConfig, engine: RolloutEngine, rollout: Sampler, examples: list[Example],
        scorer: RewardScorer,
    ) -> Evaluator:
        """The recipe's passes, slices (checked against `examples`: `EvalError`) and eval-only metrics."""
        slices = check_held_out(examples, config.eval) if examples else []
        metric_scorer = RewardScorer(config.eval.metrics) if config.eval.metrics else None
        return cls(engine, rollout, examples, scorer, eval_plans(config), slices, metric_scorer)

    @property
    def main_mode(self) -> str:
        """The first pass's mode: the one before / after, the monitors and the report follow."""
        return self.plans[0].mode

    def run(self, label: str) -> list[EvalResult]:
        """Every plan's result, the main one first."""
        return [self.evaluate(label, plan) for plan in self.plans]

    def baseline(self, config: RecipeConfig) -> list[EvalResult]:
        """The base model's results (labelled `base`): from the baseline cache when nothing changed."""
        return cached_baseline(config, self.examples, self.plans, self.slices, self.engine.name,
                               lambda: self.run("base"))

    def evaluate(self, label: str, plan: EvalPlan) -> EvalResult:
        """Sample `plan.samples_per_prompt` completions per held-out prompt, score them, summarise.

        Sampling runs under a forked RNG seeded with `plan.seed`, and each batch with its own seed from
        it (vLLM): the same prompts get the same random stream before and after training, and evaluating
        does not shift the training run's randomness.
        """
        per_prompt: list[dict[str, float]] = []
        samples: list[dict[str, Any]] = []
        with torch.random.fork_rng():
            torch.manual_seed(plan.seed)
            for start in range(0, len(self.examples), plan.batch_size):
                sampling = plan.sampling.seeded(plan.seed, start)
                chunk = self._sample_and_score(self.examples[start : start + plan.batch_size], plan, sampling)
                per_prompt += [prompt_values(chunk, i, plan) for i in range(len(chunk.examples))]
                samples += self._samples(chunk, plan.keep_samples - len(samples))
        return summarise(label, plan, self.examples, per_prompt, self.slices, samples)

    def _sample_and_score(
        self, examples: list[Example], plan: EvalPlan, sampling: SamplingSettings
    ) -> ScoredChunk:
        n = plan.samples_per_prompt
        rollout = self.rollout.sample(self.engine, examples, n, sampling)
        scored = score_groups(self.scorer, examples, rollout, n, call_per_group=False)
        metric_scores = None
        if self.metric_scorer is not None:
            metric_scores = self.metric_scorer.score_examples(scored.rows, scored.completions,
                                                              rollout.completion_ids)
        return ScoredChunk(examples, n, scored.completions, scored.scores, metric_scores)

    def _samples(self, chunk: ScoredChunk, room: int) -> list[dict[str, Any]]:
        """Up to `room` prompts' first completions, kept for the report."""
        return [
            {
                "prompt": example.prompt, "completion": chunk.completions[i * chunk.n],
                "reward": chunk.scores.total[i * chunk.n],
                "tags": {tag: tag_value(example.row.get(tag)) for tag in self.slices},
            }
            for i, example in enumerate(chunk.examples[: max(room, 0)])
        ]
