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
"""

from __future__ import annotations

import asyncio
import inspect
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.base import RewardContractError, RewardValues
from rft.config import RewardConfig, ScoringConfig
from rft.metrics import Accumulator, Metric, Reduction, merged
from rft.reward_context import RewardLog, RewardState, accepted_context, call_reward
from rft.reward_loading import RewardError, RewardFunction, build_reward, declared_columns
from rft.reward_workers import START_TIMEOUT_S, WorkerPool, WorkerStartError, WorkerTimeout

# Larger magnitudes overflow squares in float64 (the std of a group) and swamp every other reward.
MAX_ABS_REWARD = 1e12
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
            merged([self.sums, later.sums]), self.seconds + later.seconds, {**self.failures_total, **later.failures_total}
        )

    def result(self) -> dict[str, float]:
        totals = {f"reward/{name}/failures_total": float(count) for name, count in self.failures_total.items()}
        return {**self.sums.result(), **totals, "time/reward_functions": self.seconds}


def _preflight(config: RewardConfig, function: RewardFunction) -> None:
    """A reward's `preflight(**recipe kwargs it takes)`, if it has one: can it work here at all? Run once, at start."""
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


@dataclass
class _Reward:
    name: str
    weight: float
    function: RewardFunction
    timeout_s: float
    columns: dict[str, str] = field(default_factory=dict)  # parameter -> dataset column it reads
    pool: WorkerPool | None = None  # isolation: process
    accepted: tuple[str, ...] = ()  # the context arguments it takes (rft.reward_context)


@dataclass
class _Call:
    reward: _Reward
    start: int
    stop: int
    kwargs: dict[str, Any]


@dataclass
class _Outcome:
    values: list[float | None] | None = None
    components: dict[str, list[float | None]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    kind: str = ""  # "error", "timeout" or "invalid" for failures
    log: RewardLog | None = None  # what the call logged through log_metric / log_extra


class _ContractError(Exception):
    pass


class RewardScorer:
    """Calls every configured reward function on a batch and combines them with their weights."""

    def __init__(self, configs: Sequence[RewardConfig], scoring: ScoringConfig | None = None):
        self.scoring = scoring or ScoringConfig()
        self.rewards: list[_Reward] = []
        for config in configs:
            default_name, function = build_reward(config.fn, config.kwargs, config.build)
            _preflight(config, function)
            self.rewards.append(
                _Reward(
                    name=config.name or default_name,
                    weight=config.weight,
                    function=function,
                    timeout_s=config.timeout_s or self.scoring.timeout_s,
                    columns=declared_columns(config.fn, config.kwargs, config.build),
                    pool=WorkerPool(config.fn, config.kwargs, self.scoring.memory_mb, self.scoring.concurrency,
                                    config.build) if self.scoring.isolation == "process" else None,
                    accepted=accepted_context(function),
                )
            )
        names = self.names
        if len(set(names)) != len(names):
            raise RewardError(f"reward names must be unique, got {names}; set `name:` in the recipe")
        # What rewards see as `trainer_state` (rft.reward_context); the trainer sets it before each step.
        self.state = RewardState()
        # Run-long failure counts, so a slow trickle of failures is visible at any step.
        self.failure_totals: dict[str, int] = {name: 0 for name in names}

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
                "; ".join(problems) + "; set the reward's kwargs in the recipe, or map the column with data.column_map"
            )

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
            calls.extend(_Call(reward, start, stop, kwargs) for reward in self.rewards)
        started = time.perf_counter()
        outcomes = self._run(calls, rows) if count else []
        return self._combine(calls, outcomes, count, time.perf_counter() - started)

    def _run(self, calls: list[_Call], rows: Sequence[dict[str, Any]]) -> list[_Outcome]:
        """Run calls in daemon threads, at most `concurrency` at once, each under its own deadline.

        Daemon threads rather than a ThreadPoolExecutor: a hung call must not occupy a pool worker
        for the rest of the run or block interpreter exit.
        """
        results: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()
        outcomes: list[_Outcome | None] = [None] * len(calls)
        deadlines: dict[int, float] = {}
        next_call = 0
        while next_call < len(calls) or deadlines:
            while next_call < len(calls) and len(deadlines) < self.scoring.concurrency:
                call = calls[next_call]
                # A worker enforces the limit itself, after it started; this deadline is the backstop.
                allowance = START_TIMEOUT_S + 5 if call.reward.pool is not None else 0.0
                deadlines[next_call] = time.monotonic() + call.reward.timeout_s + allowance
                thread = threading.Thread(
                    target=_invoke, args=(next_call, call, self.state, results), daemon=True,
                    name=f"reward-{call.reward.name}-{call.start}",
                )
                thread.start()
                next_call += 1
            wait = max(0.0, min(deadlines.values()) - time.monotonic())
            try:
                index, value, error = results.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                for index, deadline in list(deadlines.items()):
                    if deadline <= now:
                        del deadlines[index]
                        outcomes[index] = _timeout(calls[index])
                        self._stop_if_asked(outcomes[index])
                continue
            if index not in deadlines:  # finished after its deadline: already counted as a timeout
                continue
            del deadlines[index]
            call = calls[index]
            if isinstance(error, RewardContractError | WorkerStartError):
                raise RewardError(f"reward {call.reward.name!r}: {error}") from error
            if isinstance(error, WorkerTimeout):
                outcomes[index] = _timeout(call)
            elif error is not None:
                outcomes[index] = _Outcome(
                    failure=f"reward {call.reward.name!r} raised {type(error).__name__}: {error}", kind="error"
                )
            else:
                value, log = value
                try:
                    outcomes[index] = _check(call, value, rows)
                except _ContractError as exc:
                    raise RewardError(str(exc)) from None
                outcomes[index].log = log
            self._stop_if_asked(outcomes[index], error)
        return [outcome for outcome in outcomes if outcome is not None]

    def _stop_if_asked(self, outcome: _Outcome | None, cause: BaseException | None = None) -> None:
        if outcome is not None and outcome.failure and self.scoring.on_error == "stop":
            raise RewardError(
                f"{outcome.failure} (scoring.on_error: stop; set it to zero or skip_group to go on)"
            ) from cause

    def _combine(self, calls: list[_Call], outcomes: list[_Outcome], count: int, seconds: float) -> ScoreOutput:
        total = [0.0] * count
        failed = [False] * count
        per_function: dict[str, list[float | None]] = {r.name: [None] * count for r in self.rewards}
        components: dict[str, list[float | None]] = {}
        counters: dict[str, float] = {}
        extras: dict[str, list[Any]] = {}
        logged: dict[str, list[float]] = {}
        failures = {r.name: {"error": 0, "timeout": 0, "invalid": 0} for r in self.rewards}
        errors: list[str] = []
        for call, outcome in zip(calls, outcomes, strict=True):
            name = call.reward.name
            span = range(call.start, call.stop)
            if outcome.failure:
                failures[name][outcome.kind] += 1
                self.failure_totals[name] += 1
                errors.append(outcome.failure)
                for i in span:
                    if self.scoring.on_error == "zero":
                        per_function[name][i] = 0.0
                    else:
                        failed[i] = True
                continue
            assert outcome.values is not None
            for i, value in zip(span, outcome.values, strict=True):
                per_function[name][i] = value
            for key, series in outcome.components.items():
                column = components.setdefault(f"{name}/{key}", [None] * count)
                for i, value in zip(span, series, strict=True):
                    column[i] = value
            for key, value in outcome.counters.items():
                counters[f"reward/{name}/{key}"] = counters.get(f"reward/{name}/{key}", 0.0) + value
            if outcome.log is not None:
                for key, values in outcome.log.metrics.items():
                    logged.setdefault(key, []).extend(values)
                for key, values in outcome.log.extras.items():
                    extras.setdefault(key, [None] * count)[call.start:call.stop] = values
        sums = Accumulator()
        for reward in self.rewards:
            values = per_function[reward.name]
            for i, value in enumerate(values):
                if value is not None:
                    total[i] += reward.weight * value
            _add_present(sums, f"reward/{reward.name}", values)
            sums.add(Metric(f"reward/{reward.name}/none_share", Reduction.MEAN), values.count(None), count)
            for kind, number in failures[reward.name].items():
                sums.add(Metric(f"reward/{reward.name}/{kind}s", Reduction.SUM), number)
        for key, series in components.items():
            _add_present(sums, f"reward/{key}", series, std=False)
        for key, value in counters.items():
            sums.add(Metric(key, Reduction.SUM), value)
        # log_metric: TRL's mean over every value logged in the step, under the name as given.
        for key, values in logged.items():
            sums.add(Metric(key, Reduction.MEAN), sum(values), len(values))
        sums.describe("reward/total", total, extremes=False)
        sums.add(Metric("reward/failed_share", Reduction.MEAN), sum(failed), count)
        stats = ScoreMetrics(sums, seconds, dict(self.failure_totals))
        return ScoreOutput(
            total=total, per_function=per_function, stats=stats, failed=failed, components=components, errors=errors,
            extras=extras,
        )


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {key: [row.get(key) for row in rows] for key in keys if key not in _RESERVED_COLUMNS}


def _timeout(call: _Call) -> _Outcome:
    return _Outcome(
        failure=f"reward {call.reward.name!r} timed out after {call.reward.timeout_s:g} s "
        f"on completions {call.start}..{call.stop - 1}",
        kind="timeout",
    )


def _invoke(index: int, call: _Call, state: RewardState, results: queue.Queue) -> None:
    """Puts (index, (value, log), None) or (index, None, error)."""
    try:
        if call.reward.pool is not None:
            results.put((index, call.reward.pool.call(call.kwargs, state, call.reward.timeout_s), None))
            return
        value, log = call_reward(call.reward.function, call.reward.accepted, call.kwargs, state)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value, call.reward.timeout_s))
        results.put((index, (value, log), None))
    except BaseException as exc:  # reported to the scorer thread, which applies the policy
        results.put((index, None, exc))


async def _await(awaitable: Any, timeout_s: float) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


def _check(call: _Call, values: Any, rows: Sequence[dict[str, Any]]) -> _Outcome:
    name = call.reward.name
    expected = call.stop - call.start
    if not isinstance(values, list | tuple):
        raise _ContractError(f"reward {name!r} returned {type(values).__name__}, expected a list of floats")
    if len(values) != expected:
        raise _ContractError(f"reward {name!r} returned {len(values)} values for {expected} completions")
    checked: list[float | None] = []
    for offset, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        where = _where(call.start + offset, rows)
        number = None
        if not isinstance(value, bool | str):
            try:
                number = float(value)  # also numpy and torch scalars
            except (TypeError, ValueError):
                number = None
        if number is None:
            return _Outcome(failure=f"reward {name!r} returned {value!r} (not a number) for {where}", kind="invalid")
        if not math.isfinite(number):
            return _Outcome(failure=f"reward {name!r} returned {number} for {where}; rewards must be finite", kind="invalid")
        if abs(number) > MAX_ABS_REWARD:
            return _Outcome(
                failure=f"reward {name!r} returned {number:g} for {where}; rewards beyond ±{MAX_ABS_REWARD:g} "
                "overflow the group statistics (their squares leave float range)", kind="invalid",
            )
        checked.append(number)
    components: dict[str, list[float | None]] = {}
    counters: dict[str, float] = {}
    if isinstance(values, RewardValues):
        components = values.components
        counters = values.counters
    return _Outcome(values=checked, components=components, counters=counters)


def _where(index: int, rows: Sequence[dict[str, Any]]) -> str:
    row = rows[index]
    for key in ("id", "row_id", "uid"):
        if key in row:
            return f"completion {index} (row {key}={row[key]!r})"
    return f"completion {index}"


def _add_present(sums: Accumulator, prefix: str, values: Sequence[float | None], std: bool = True) -> None:
    """Mean (and std) of the values that are not None: `None` is "not applicable", not 0."""
    sums.describe(prefix, [v for v in values if v is not None], extremes=False, std=std)
