"""A step's training data: sample groups, score them, gather them across processes, keep (DAPO dynamic
sampling) the groups that teach something, and compute their advantages.

Every process draws the same global prompts (so the data position is the same everywhere and resume
works) and generates and scores whole groups for its own contiguous share; after the gather every
process holds the global batch, in global prompt order, and takes the same decisions on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from rft import algorithms, distributed
from rft.config import AlgorithmConfig, RecipeConfig
from rft.data import Example, PromptSampler
from rft.metrics import (
    ADVANTAGE_PREFIX,
    COMPLETION_TOKENS,
    DYNAMIC_GROUPS,
    DYNAMIC_PASS_RATE,
    DYNAMIC_ROUNDS,
    LENGTH_PREFIX,
    OVERLONG_PENALTY,
    REWARD_PREFIX,
    TIME_GENERATION,
    TIME_REWARD,
    TRUNCATED_SHARE,
    ZERO_VARIANCE_SHARE,
)
from rft.rollout.base import RolloutEngine
from rft.scoring import RewardScorer, ScoreMetrics, score_groups
from rft.step_metrics import Accumulator
from rft.timing import marked_timer
from rft.trajectories import Sampler, Trajectories

logger = logging.getLogger(__name__)

# What a scored round's completions are handed to (the run log's completions file): the rows, the
# completions as the rewards saw them, the rewards [B], and what rewards logged per completion.
CompletionSink = Callable[[list[Example], list[Any], torch.Tensor, dict[str, list[Any]]], None]


@dataclass
class Group:
    """One prompt's G completions, scored."""

    prompt_ids: list[int]  # [P] the prompt, shared by the group
    completion_ids: list[list[int]]  # G x [L_i]
    rollout_logprobs: list[list[float]] | None  # G x [L_i], the sampler's; None where the engine gives none
    truncated: list[bool]  # [G] cut by a length limit (max_new_tokens, an episode's token budget)
    rewards: torch.Tensor  # [G], float64
    zero_variance: bool  # every reward of the group equal: no advantage, nothing to learn
    # G x [L_i]: 1 on the model's tokens, 0 on an environment's (agent episodes); None: all the model's
    completion_masks: list[list[int]] | None = None


@dataclass
class Batch:
    """A step's training sequences in group order (G consecutive sequences share a prompt); B = groups x G."""

    prompt_ids: list[list[int]]  # B x [P_i]
    completion_ids: list[list[int]]  # B x [L_i]
    rollout_logprobs: list[list[float]] | None  # B x [L_i]
    truncated: list[bool]  # [B]
    rewards: torch.Tensor  # [B], float64
    advantages: torch.Tensor  # [B], float32
    metrics: dict[str, float] = field(default_factory=dict)
    completion_masks: list[list[int]] | None = None  # B x [L_i], see `Group.completion_masks`

    def __len__(self) -> int:
        return len(self.completion_ids)


def assemble(groups: list[Group], algorithm: AlgorithmConfig, metrics: dict[str, float]) -> Batch:
    """The kept groups as one batch, with their advantages and the batch's metrics added to `metrics`."""
    if not groups:
        empty = torch.zeros(0)
        return Batch([], [], None, [], empty, empty, metrics)
    rewards = torch.stack([g.rewards for g in groups])  # [groups, G]
    advantages = algorithms.compute_advantages(
        rewards, estimator=algorithm.advantage, scale=algorithm.scale, eps=algorithm.advantage_eps
    ).flatten().float()
    completion_ids = [c for g in groups for c in g.completion_ids]
    truncated = [t for g in groups for t in g.truncated]
    has_masks = groups[0].completion_masks is not None
    masks = [m for g in groups for m in g.completion_masks] if has_masks else None  # type: ignore[union-attr]
    # A completion's length is what the model generated: an environment's tokens are not its.
    lengths = torch.tensor([sum(m) for m in masks] if masks is not None else [len(c) for c in completion_ids],
                           dtype=torch.float64)
    sums = Accumulator()
    sums.describe(ADVANTAGE_PREFIX, advantages)
    sums.describe(LENGTH_PREFIX, lengths)
    sums.add(TRUNCATED_SHARE, sum(truncated), len(truncated))
    sums.add(COMPLETION_TOKENS, lengths.sum())
    metrics.update(sums.result())
    has_logprobs = all(g.rollout_logprobs is not None for g in groups)
    return Batch(
        prompt_ids=[g.prompt_ids for g in groups for _ in g.completion_ids],
        completion_ids=completion_ids,
        rollout_logprobs=[lp for g in groups for lp in g.rollout_logprobs] if has_logprobs else None,  # type: ignore[union-attr]
        truncated=truncated,
        rewards=rewards.flatten(),
        advantages=advantages,
        metrics=metrics,
        completion_masks=masks,
    )


def dynamic_sampling_metrics(rounds: int, generated: int, zero_variance: int, kept: int) -> dict[str, float]:
    return {
        DYNAMIC_ROUNDS: rounds,
        DYNAMIC_PASS_RATE: 1 - zero_variance / max(1, generated),
        DYNAMIC_GROUPS: kept,
    }


class Collector:
    """Samples, scores and gathers the groups of each step (`collect`)."""

    # The engine is handed to each `collect`: the trainer's may be replaced (wrapped) after set-up.

    def __init__(
        self, config: RecipeConfig, accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any,
        scorer: RewardScorer, sampler: PromptSampler, rollout: Sampler, on_scored: CompletionSink,
    ):
        self.config, self.accelerator, self.model = config, accelerator, model
        self.tokenizer, self.scorer, self.sampler, self.on_scored = tokenizer, scorer, sampler, on_scored
        self.rollout = rollout
        self.sampling = config.rollout.sampling()

    def collect(self, engine: RolloutEngine) -> Batch:
        """Sample groups with `engine`, score them, and (DAPO dynamic sampling) keep only groups that teach
        something."""
        algorithm, wanted = self.config.algorithm, self.config.training.prompts_per_step
        rounds = 1 if not algorithm.dynamic_sampling else algorithm.max_gen_batches
        kept: list[Group] = []
        timings: dict[str, float] = {TIME_GENERATION: 0.0, TIME_REWARD: 0.0}
        generated = zero_variance = rounds_used = 0
        # Every round's scores count: sums add over rounds (and over processes in `_gather`).
        score_metrics = ScoreMetrics()
        for _ in range(rounds):
            rounds_used += 1
            groups, round_metrics = self._round(engine, wanted, timings)
            score_metrics = score_metrics.then(round_metrics)
            generated += len(groups)
            zero_variance += sum(g.zero_variance for g in groups)
            kept += [g for g in groups if not (g.zero_variance and algorithm.dynamic_sampling)]
            if len(kept) >= wanted:
                break
        kept = kept[:wanted]
        metrics: dict[str, float] = dict(timings)
        if algorithm.dynamic_sampling:
            metrics.update(dynamic_sampling_metrics(rounds_used, generated, zero_variance, len(kept)))
            if len(kept) < wanted:
                logger.warning(
                    "dynamic sampling: %d of %d groups after %d rounds (algorithm.max_gen_batches); "
                    "training on those", len(kept), wanted, rounds_used,
                )
        metrics.update(score_metrics.result())
        metrics[ZERO_VARIANCE_SHARE] = zero_variance / max(1, generated)
        return assemble(kept, algorithm, metrics)

    def _round(
        self, engine: RolloutEngine, wanted: int, timings: dict[str, float]
    ) -> tuple[list[Group], ScoreMetrics]:
        """One round: this process's share of `wanted` prompts sampled and scored, then every process's.

        The processes of one tensor-parallel engine (`engine.tensor_parallel_size` in a row) sample
        the same share, with the same results; the first one's counts.
        """
        accelerator, tensor_parallel = self.accelerator, engine.tensor_parallel_size
        share = distributed.process_share(
            wanted, accelerator.process_index // tensor_parallel, accelerator.num_processes // tensor_parallel
        )
        # The round's seed follows the data position (restored on resume): a resumed run samples as an
        # uninterrupted one would, from the same weights.
        sampling = self.sampling.seeded(self.config.training.seed, self.sampler.position, share.start)
        examples = self.sampler.take(wanted)[share]
        weights = distributed.sampling_weights(accelerator, self.model, engine.reads_policy)
        with marked_timer(TIME_GENERATION, timings), weights:
            rollout = self.rollout.sample(engine, examples, self.config.rollout.group_size, sampling)
        with marked_timer(TIME_REWARD, timings):
            groups, metrics = self._score(examples, rollout)
        return self._gather(groups, metrics, tensor_parallel)

    def _gather(
        self, groups: list[Group], metrics: ScoreMetrics, tensor_parallel: int
    ) -> tuple[list[Group], ScoreMetrics]:
        """All engines' scored groups in process order, and their reward metrics combined."""
        if self.accelerator.num_processes == 1:
            return groups, metrics
        gathered = distributed.gather_from_processes(self.accelerator, (groups, metrics))[::tensor_parallel]
        groups = [g for part, _ in gathered for g in part]
        return groups, ScoreMetrics.of_processes([part for _, part in gathered])

    def _score(self, examples: list[Example], rollout: Trajectories) -> tuple[list[Group], ScoreMetrics]:
        config, group_size = self.config, self.config.rollout.group_size
        scored = score_groups(self.scorer, examples, rollout, group_size)
        rows, completions, scores = scored.rows, scored.completions, scored.scores
        for error in scores.errors:
            logger.warning("reward: %s", error)
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        if config.algorithm.soft_overlong:
            max_length, cache_length = config.overlong_lengths
            lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float64)
            penalty = algorithms.soft_overlong_punishment(
                lengths, max_length=max_length, cache_length=cache_length
            )
            rewards = rewards + penalty
            scores.stats.sums.add(OVERLONG_PENALTY, penalty.sum(), penalty.numel())
        scores.stats.sums.describe(REWARD_PREFIX, rewards)
        self.on_scored(rows, completions, rewards, scores.extras)
        return _groups(examples, rollout, rewards.view(-1, group_size), scores.failed), scores.stats


def _groups(
    examples: list[Example], rollout: Trajectories, rewards: torch.Tensor, failed: list[bool]
) -> list[Group]:
    """The scored groups, less those with a failed reward call (scoring.on_error: skip_group)."""
    group_size = rewards.shape[1]
    failed = failed or [False] * rewards.numel()
    zero_variance = algorithms.zero_variance_groups(rewards)
    groups = []
    for g in range(len(examples)):
        members = slice(g * group_size, (g + 1) * group_size)
        if any(failed[members]):
            continue
        logprobs = rollout.logprobs[members] if rollout.logprobs is not None else None
        groups.append(Group(
            prompt_ids=rollout.prompt_ids[g * group_size], completion_ids=rollout.completion_ids[members],
            rollout_logprobs=logprobs, truncated=rollout.truncated[members], rewards=rewards[g],
            zero_variance=bool(zero_variance[g]),
            completion_masks=rollout.masks[members] if rollout.masks is not None else None,
        ))
    return groups
