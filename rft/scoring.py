"""Run reward functions: load them by spec, call them concurrently with time limits, weight and check them.

A reward function is `fn(completions: list, **columns) -> list[float | None]` (TRL's signature). It
receives `prompts`, `completions`, `completion_ids` and every dataset column as lists aligned with
the completions. `None` means "not applicable": excluded from that function's mean and contributing 0
to the weighted sum. A recipe's `kwargs` are bound with functools.partial; when `fn` names a class,
the class is built once with them and the instance is the reward (for rewards that keep clients,
caches or loaded handlers between calls); with `build`, `fn` is a factory called once with them, and
what it returns is the reward. `async def` rewards are awaited. Rewards that take them also get TRL's
`trainer_state`, `log_metric` and `log_extra` (see `rft.reward_context`; the trainer sets `state`).

Calls and failures. With `group_size`, each reward function is called once per group of completions
(the G completions of one prompt), so a failure touches one group only; without it, once per batch.
Calls run at most `scoring.concurrency` at once, each with a time limit, in worker processes
(`scoring.isolation: process`, the default: a call past its limit has its worker killed, see
`rft.reward_workers`) or in threads (`thread`: a call past its limit is abandoned and keeps running).
A call that raises, times out, its worker dies, or returns NaN, infinity or a non-number is a
*failure*, handled by `scoring.on_error`:

- `zero`: its completions score 0 for that function;
- `skip_group`: its completions get `None` for that function and `ScoreOutput.failed` is True for
  them; **the trainer drops every group that contains a failed completion** from the update;
- `stop`: `RewardError` at the first failure.

Failures are counted in the metrics under every policy. A function that returns something other
than a list, or the wrong number of values, or raises `rewards.base.RewardContractError` (e.g. a
Bedrock Lambda answering for ids it was not sent), breaks its contract: `RewardError` at once,
whatever the policy, because every later batch would fail the same way.

Where it lives: the calls themselves run in `rft.reward_calls`; rewards are loaded through the one door
`rft.reward_loading`. `score_groups` is the one way from sampled token ids to rewards (expand the
examples to their completions, decode, score) for the trainer, the evaluator and `rft reward check`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rft.config import DataConfig, RewardConfig, ScoringConfig
from rft.data import Example
from rft.metrics import ENVIRONMENT_REWARD, reward_key
from rft.reward_calls import Call, Outcome, Reward, Spread, run_calls
from rft.reward_context import RewardState, accepted_context
from rft.reward_loading import (
    RewardContractError,
    RewardError,
    RewardFunction,
    build_reward,
    declared_columns,
)
from rft.reward_workers import WorkerPool
from rft.step_metrics import Accumulator, merged
from rft.trajectories import Trajectories

__all__ = ["RewardError", "RewardScorer", "ScoreMetrics", "ScoreOutput", "ScoredGroups", "score_groups"]

# The name an agent environment's rewards go by beside the recipe's reward functions.
ENVIRONMENT = "environment"
# Columns the scorer passes itself; a row field of the same name would shadow them.
_RESERVED_COLUMNS = ("prompt", "prompts", "completions", "completion_ids")


@dataclass
class ScoreMetrics:
    """A scoring call's metrics, in parts that combine exactly over processes and dynamic-sampling rounds.

    `sums`: per function the share of `None` (over all completions), the mean and std of the present
    values, failure counts by kind and the function's counters; the mean of each component; the
    mean and std of the weighted total; the share of completions of a failed call (see `rft.metrics`).
    `seconds`: wall time in the reward functions. `failures_total`: the scorer's run-long failure
    count by function, after this call.
    """

    sums: Accumulator = field(default_factory=Accumulator)
    seconds: float = 0.0
    failures_total: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of_processes(parts: Sequence[ScoreMetrics]) -> ScoreMetrics:
        """One round scored by several processes side by side: sums add, the slowest one's time counts."""
        names = {name for part in parts for name in part.failures_total}
        return ScoreMetrics(
            merged(part.sums for part in parts), max((part.seconds for part in parts), default=0.0),
            {name: sum(part.failures_total.get(name, 0) for part in parts) for name in sorted(names)},
        )

    def then(self, later: ScoreMetrics) -> ScoreMetrics:
        """This round followed by `later`: sums and times add; the run-long totals are the later ones."""
        return ScoreMetrics(
            merged([self.sums, later.sums]), self.seconds + later.seconds,
            {**self.failures_total, **later.failures_total},
        )

    def result(self) -> dict[str, float]:
        totals = {
            reward_key(name, "failures_total"): float(count) for name, count in self.failures_total.items()
        }
        return {**self.sums.result(), **totals, "time/reward_functions": self.seconds}


def _preflight(config: RewardConfig, function: RewardFunction) -> None:
    """A reward's `preflight(**recipe kwargs it takes)`, if it has one: can it work here at all?
    Run once, at start."""
    preflight = getattr(getattr(function, "func", function), "preflight", None)
    if preflight is None:
        return
    accepted = inspect.signature(preflight).parameters
    try:
        preflight(**{key: value for key, value in config.kwargs.items() if key in accepted})
    except RewardContractError as exc:
        raise RewardError(f"reward {config.name or config.fn!r}: {exc}") from None


@dataclass
class ScoreOutput:
    """Rewards of one batch.

    `total[i]` is the weighted sum for completion i; `per_function[name][i]` the function's value
    (None: not applicable, or failed under `skip_group`); `components["name/component"][i]` the
    per-completion parts a function reported through `RewardValues`; `failed[i]` says a reward call
    covering completion i failed under `skip_group`, and the trainer must drop that completion's
    whole group; `errors` holds one line per failed call, for the log; `extras[column][i]` what a reward
    logged for completion i through `log_extra` (None where nothing was); `stats` the metrics, in parts
    that combine with other batches', and `metrics` those of this batch alone.
    """

    total: list[float]
    per_function: dict[str, list[float | None]]
    stats: ScoreMetrics = field(default_factory=ScoreMetrics)
    failed: list[bool] = field(default_factory=list)
    components: dict[str, list[float | None]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    extras: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return self.stats.result()


class RewardScorer:
    """Calls every configured reward function on a batch and combines them with their weights."""

    def __init__(self, configs: Sequence[RewardConfig], scoring: ScoringConfig | None = None):
        self.scoring = scoring or ScoringConfig()
        self.rewards: list[Reward] = [self._reward(config) for config in configs]
        names = self.names
        if len(set(names)) != len(names):
            raise RewardError(f"reward names must be unique, got {names}; set `name:` in the recipe")
        # What rewards see as `trainer_state` (rft.reward_context); the trainer sets it before each step.
        self.state = RewardState()
        # Run-long failure counts, so a slow trickle of failures is visible at any step.
        self.failure_totals: dict[str, int] = {name: 0 for name in names}

    def _reward(self, config: RewardConfig) -> Reward:
        default_name, function = build_reward(config.fn, config.kwargs, config.build)
        _preflight(config, function)
        pool = None
        if self.scoring.isolation == "process":
            pool = WorkerPool(
                config.fn, config.kwargs, self.scoring.memory_mb, self.scoring.concurrency, config.build
            )
        return Reward(
            name=config.name or default_name,
            weight=config.weight,
            function=function,
            timeout_s=config.timeout_s or self.scoring.timeout_s,
            columns=declared_columns(config.fn, config.kwargs, config.build),
            pool=pool,
            accepted=accepted_context(function),
        )

    @property
    def names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    def check_columns(self, rows_by_source: dict[str, Sequence[dict[str, Any]]]) -> None:
        """One RewardError naming every declared column (`declared_columns`) that no row of a source has."""
        problems = []
        for source, rows in rows_by_source.items():
            fields = {key for row in rows for key in row}
            missing = [
                f"reward {reward.name}: {parameter} {column!r} is in no row of {source}"
                for reward in self.rewards
                for parameter, column in reward.columns.items()
                if column not in fields and column not in _RESERVED_COLUMNS
            ]
            if missing and rows:
                problems.append("; ".join(missing) + f" (its rows have: {', '.join(sorted(fields))})")
        if problems:
            raise RewardError(
                "; ".join(problems)
                + "; set the reward's kwargs in the recipe, or map the column with data.column_map"
            )

    def check_splits(self, data: DataConfig, train: Sequence[Example], held_out: Sequence[Example]) -> None:
        """`check_columns` over a recipe's training and held-out rows, each named by where it comes from."""
        self.check_columns({f"data.train ({data.train})": [e.row for e in train],
                            f"the held-out rows ({data.eval or data.train})": [e.row for e in held_out]})

    @property
    def functions(self) -> list[tuple[str, float, RewardFunction]]:
        return [(r.name, r.weight, r.function) for r in self.rewards]

    def close(self) -> None:
        """Stop the rewards' worker processes (they also end with the process) and close the rewards that hold
        resources here (a judge's HTTP client and thread): those with a `close()`."""
        for reward in self.rewards:
            if reward.pool is not None:
                reward.pool.close()
            close = getattr(reward.function, "close", None)
            if callable(close):
                close()

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        rows: Sequence[dict[str, Any]],
        group_size: int | None = None,
    ) -> ScoreOutput:
        """Score a batch. `rows[i]` is the dataset row of completion i; with `group_size`, the batch is
        prompt-major groups of that size and each reward is called once per group."""
        count = len(completions)
        if not (len(prompts) == len(completion_ids) == len(rows) == count):
            raise RewardError(
                f"score(): {len(prompts)} prompts, {count} completions, {len(completion_ids)} id lists and "
                f"{len(rows)} rows; they must be aligned"
            )
        if group_size is not None and (group_size < 1 or count % group_size):
            raise RewardError(f"score(): {count} completions do not split into groups of {group_size}")
        columns = _columns(rows)
        unit = group_size or max(1, count)
        calls = []
        for start in range(0, count, unit):
            stop = min(count, start + unit)
            kwargs = {
                "prompts": list(prompts[start:stop]),
                "completions": list(completions[start:stop]),
                "completion_ids": [list(ids) for ids in completion_ids[start:stop]],
                **{key: values[start:stop] for key, values in columns.items()},
            }
            calls.extend(Call(reward, start, stop, kwargs) for reward in self.rewards)
        started = time.perf_counter()
        stop_on_failure = self.scoring.on_error == "stop"
        outcomes: list[Outcome] = []
        if count:
            outcomes = run_calls(calls, rows, self.state, self.scoring.concurrency, stop_on_failure)
        return self._combine(calls, outcomes, count, time.perf_counter() - started)

    def score_examples(
        self, rows: Sequence[Example], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
        group_size: int | None = None,
    ) -> ScoreOutput:
        """`score` with the prompt and dataset row of each completion read from its example (`rows[i]`)."""
        prompts = [e.prompt for e in rows]
        return self.score(prompts, completions, completion_ids, [e.row for e in rows], group_size)

    def _combine(self, calls: list[Call], outcomes: list[Outcome], count: int, seconds: float) -> ScoreOutput:
        spread = Spread.of(self.rewards, count)
        for call, outcome in zip(calls, outcomes, strict=True):
            if outcome.failure:
                self.failure_totals[call.reward.name] += 1
                spread.fail(call, outcome, zero=self.scoring.on_error == "zero")
            else:
                spread.add(call, outcome)
        total = [0.0] * count
        for reward in self.rewards:
            for i, value in enumerate(spread.per_function[reward.name]):
                if value is not None:
                    total[i] += reward.weight * value
        stats = ScoreMetrics(spread.sums(self.rewards, total), seconds, dict(self.failure_totals))
        return ScoreOutput(
            total=total, per_function=spread.per_function, stats=stats, failed=spread.failed,
            components=spread.components, errors=spread.errors, extras=spread.extras,
        )


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {key: [row.get(key) for row in rows] for key in keys if key not in _RESERVED_COLUMNS}


# ------------------------------------------------------------------ sampled groups: score
@dataclass(frozen=True)
class ScoredGroups:
    """`group_size` sampled completions of each example, prompt-major, as the rewards saw them; their scores.

    `rows[i]` is the example completion i answers (`examples[i // group_size]`), `completions[i]` its
    decoded text (TRL's chat form after a chat prompt); `scores` the `ScoreOutput` over all of them.
    """

    rows: list[Example]
    completions: list[Any]
    scores: ScoreOutput


def score_groups(
    scorer: RewardScorer,
    examples: Sequence[Example],
    trajectories: Trajectories,
    group_size: int,
    *,
    call_per_group: bool = True,
) -> ScoredGroups:
    """Score `group_size` sampled trajectories of each example: the trainer's, the evaluator's and `rft
    reward check`'s way from samples to rewards. `call_per_group`: each reward is called once per group
    (a failure touches one group), else once for the whole batch."""
    completions = trajectories.completions
    rows = [examples[i // group_size] for i in range(len(completions))]
    scores = scorer.score_examples(
        rows, completions, trajectories.completion_ids, group_size if call_per_group else None
    )
    if trajectories.environment_rewards is not None:
        _add_environment_rewards(scores, trajectories.environment_rewards)
    for metric, (total, count) in trajectories.sums.items():
        scores.stats.sums.add(metric, total, count)
    return ScoredGroups(rows, completions, scores)


def _add_environment_rewards(scores: ScoreOutput, rewards: list[float]) -> None:
    """An agent environment's rewards join the recipe's: added to the total, listed as `environment`."""
    scores.total = [total + reward for total, reward in zip(scores.total, rewards, strict=True)]
    scores.per_function[ENVIRONMENT] = list(rewards)
    scores.stats.sums.add(ENVIRONMENT_REWARD, sum(rewards), len(rewards))
