"""One batch's reward calls: run at most `concurrency` at once, each under its time limit, and check what
each returns against the reward contract (`rft.scoring` states it; this module keeps it).

A call runs in a daemon thread, which either calls the reward itself (`scoring.isolation: thread`) or
waits on the reward's worker process (`process`, see `rft.reward_workers`). Daemon threads rather
than a ThreadPoolExecutor: a hung call must not occupy a pool worker for the rest of the run or block
interpreter exit. Each finished call becomes an `Outcome`: its checked values, or a failure with its
kind (`error`, `timeout`, `invalid`). Contract breaches raise `RewardError` at once. `Spread` lays
the outcomes out per completion and counts them for the metrics.
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

from rft.metrics import Metric, Reduction, reward_key
from rft.reward_context import RewardLog, RewardState, call_reward
from rft.reward_loading import RewardContractError, RewardError, RewardFunction, RewardValues
from rft.reward_workers import START_TIMEOUT_S, WorkerPool, WorkerStartError, WorkerTimeout
from rft.step_metrics import Accumulator

# Larger magnitudes overflow squares in float64 (the std of a group) and swamp every other reward.
MAX_ABS_REWARD = 1e12


@dataclass
class Reward:
    """A configured reward as the scorer calls it."""

    name: str
    weight: float
    function: RewardFunction
    timeout_s: float
    columns: dict[str, str] = field(default_factory=dict)  # parameter -> dataset column it reads
    pool: WorkerPool | None = None  # isolation: process
    accepted: tuple[str, ...] = ()  # the context arguments it takes (rft.reward_context)


@dataclass
class Call:
    """One call of one reward on completions `start` to `stop - 1` of the batch."""

    reward: Reward
    start: int
    stop: int
    kwargs: dict[str, Any]


@dataclass
class Outcome:
    """What one call gave: checked `values`, or a `failure` line and its `kind`."""

    values: list[float | None] | None = None
    components: dict[str, list[float | None]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    kind: str = ""  # "error", "timeout" or "invalid" for failures
    log: RewardLog | None = None  # what the call logged through log_metric / log_extra


class _ContractError(Exception):
    pass


def run_calls(
    calls: list[Call],
    rows: Sequence[dict[str, Any]],
    state: RewardState,
    concurrency: int,
    stop_on_failure: bool,
) -> list[Outcome]:
    """Every call's outcome, in call order; with `stop_on_failure`, RewardError at the first failure."""
    results: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()
    outcomes: list[Outcome | None] = [None] * len(calls)
    deadlines: dict[int, float] = {}
    next_call = 0
    while next_call < len(calls) or deadlines:
        while next_call < len(calls) and len(deadlines) < concurrency:
            deadlines[next_call] = _start(next_call, calls[next_call], state, results)
            next_call += 1
        wait = max(0.0, min(deadlines.values()) - time.monotonic())
        try:
            index, value, error = results.get(timeout=wait)
        except queue.Empty:
            now = time.monotonic()
            for index in [i for i, deadline in deadlines.items() if deadline <= now]:
                del deadlines[index]
                outcomes[index] = _timeout(calls[index])
                _stop_if_asked(outcomes[index], stop_on_failure)
            continue
        if deadlines.pop(index, None) is None:  # finished after its deadline: already counted as a timeout
            continue
        outcomes[index] = _outcome(calls[index], value, error, rows)
        _stop_if_asked(outcomes[index], stop_on_failure, error)
    return [outcome for outcome in outcomes if outcome is not None]


def _start(index: int, call: Call, state: RewardState, results: queue.Queue) -> float:
    """Start a call in its daemon thread; its deadline."""
    # A worker enforces the limit itself, after it started; this deadline is the backstop.
    allowance = START_TIMEOUT_S + 5 if call.reward.pool is not None else 0.0
    deadline = time.monotonic() + call.reward.timeout_s + allowance
    thread = threading.Thread(
        target=_invoke, args=(index, call, state, results), daemon=True,
        name=f"reward-{call.reward.name}-{call.start}"
    )
    thread.start()
    return deadline


def _outcome(call: Call, value: Any, error: BaseException | None, rows: Sequence[dict[str, Any]]) -> Outcome:
    """A finished call's outcome; RewardError when the reward broke its contract."""
    if isinstance(error, RewardContractError | WorkerStartError):
        raise RewardError(f"reward {call.reward.name!r}: {error}") from error
    if isinstance(error, WorkerTimeout):
        return _timeout(call)
    if error is not None:
        failure = f"reward {call.reward.name!r} raised {type(error).__name__}: {error}"
        return Outcome(failure=failure, kind="error")
    value, log = value
    try:
        outcome = _check(call, value, rows)
    except _ContractError as exc:
        raise RewardError(str(exc)) from None
    outcome.log = log
    return outcome


def _stop_if_asked(
    outcome: Outcome | None, stop_on_failure: bool, cause: BaseException | None = None
) -> None:
    if outcome is not None and outcome.failure and stop_on_failure:
        raise RewardError(
            f"{outcome.failure} (scoring.on_error: stop; set it to zero or skip_group to go on)"
        ) from cause


def _timeout(call: Call) -> Outcome:
    return Outcome(
        failure=f"reward {call.reward.name!r} timed out after {call.reward.timeout_s:g} s "
        f"on completions {call.start}..{call.stop - 1}",
        kind="timeout",
    )


def _invoke(index: int, call: Call, state: RewardState, results: queue.Queue) -> None:
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


def _check(call: Call, values: Any, rows: Sequence[dict[str, Any]]) -> Outcome:
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
        number, problem = _number(name, value, _where(call.start + offset, rows))
        if problem:
            return Outcome(failure=problem, kind="invalid")
        checked.append(number)
    if isinstance(values, RewardValues):
        return Outcome(values=checked, components=values.components, counters=values.counters)
    return Outcome(values=checked)


def _number(name: str, value: Any, where: str) -> tuple[float, str]:
    """A reward's value as a float, or the failure line that says why it is none ("" when it is)."""
    number = None
    if not isinstance(value, bool | str):
        try:
            number = float(value)  # also numpy and torch scalars
        except (TypeError, ValueError):
            number = None
    if number is None:
        return 0.0, f"reward {name!r} returned {value!r} (not a number) for {where}"
    if not math.isfinite(number):
        return number, f"reward {name!r} returned {number} for {where}; rewards must be finite"
    if abs(number) > MAX_ABS_REWARD:
        return number, (
            f"reward {name!r} returned {number:g} for {where}; rewards beyond ±{MAX_ABS_REWARD:g} "
            "overflow the group statistics (their squares leave float range)"
        )
    return number, ""


def _where(index: int, rows: Sequence[dict[str, Any]]) -> str:
    row = rows[index]
    for key in ("id", "row_id", "uid"):
        if key in row:
            return f"completion {index} (row {key}={row[key]!r})"
    return f"completion {index}"


@dataclass
class Spread:
    """Outcomes laid out per completion (each call covers a span of the batch), and what they count."""

    count: int
    per_function: dict[str, list[float | None]]
    failures: dict[str, dict[str, int]]  # reward -> failure kind -> calls
    failed: list[bool]
    components: dict[str, list[float | None]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    extras: dict[str, list[Any]] = field(default_factory=dict)
    logged: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def of(rewards: Sequence[Reward], count: int) -> Spread:
        return Spread(
            count, {r.name: [None] * count for r in rewards},
            {r.name: {"error": 0, "timeout": 0, "invalid": 0} for r in rewards}, [False] * count,
        )

    def fail(self, call: Call, outcome: Outcome, zero: bool) -> None:
        """A failed call: its completions score 0 (`on_error: zero`) or are marked failed (`skip_group`)."""
        self.failures[call.reward.name][outcome.kind] += 1
        self.errors.append(outcome.failure or "")
        for i in range(call.start, call.stop):
            if zero:
                self.per_function[call.reward.name][i] = 0.0
            else:
                self.failed[i] = True

    def add(self, call: Call, outcome: Outcome) -> None:
        name, span = call.reward.name, slice(call.start, call.stop)
        assert outcome.values is not None
        self.per_function[name][span] = outcome.values
        for key, series in outcome.components.items():
            self.components.setdefault(f"{name}/{key}", [None] * self.count)[span] = series
        for key, value in outcome.counters.items():
            counter = reward_key(name, key)
            self.counters[counter] = self.counters.get(counter, 0.0) + value
        if outcome.log is not None:
            for key, values in outcome.log.metrics.items():
                self.logged.setdefault(key, []).extend(values)
            for key, values in outcome.log.extras.items():
                self.extras.setdefault(key, [None] * self.count)[span] = values

    def sums(self, rewards: Sequence[Reward], total: list[float]) -> Accumulator:
        """The batch's metrics, in parts that combine with other batches' (`ScoreMetrics.sums`)."""
        sums = Accumulator()
        for reward in rewards:
            values = self.per_function[reward.name]
            _add_present(sums, reward_key(reward.name), values)
            none_share = Metric(reward_key(reward.name, "none_share"), Reduction.MEAN)
            sums.add(none_share, values.count(None), self.count)
            for kind, number in self.failures[reward.name].items():
                sums.add(Metric(reward_key(reward.name, f"{kind}s"), Reduction.SUM), number)
        for key, series in self.components.items():
            _add_present(sums, reward_key(key), series, std=False)
        for key, value in self.counters.items():
            sums.add(Metric(key, Reduction.SUM), value)
        # log_metric: TRL's mean over every value logged in the step, under the name as given.
        for key, values in self.logged.items():
            sums.add(Metric(key, Reduction.MEAN), sum(values), len(values))
        sums.describe("reward/total", total, extremes=False)
        sums.add(Metric("reward/failed_share", Reduction.MEAN), sum(self.failed), self.count)
        return sums


def _add_present(sums: Accumulator, prefix: str, values: Sequence[float | None], std: bool = True) -> None:
    """Mean (and std) of the values that are not None: `None` is "not applicable", not 0."""
    sums.describe(prefix, [v for v in values if v is not None], extremes=False, std=std)
