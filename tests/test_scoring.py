"""The reward scorer: weights, concurrency, time limits, failure policies and contract checks."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from pathlib import Path

import pytest

from rewards.base import RewardContractError, RewardValues
from rft.config import ConfigError, RewardConfig, ScoringConfig, load_config
from rft.scoring import RewardError, RewardScorer

HERE = Path(__file__).resolve()


# -- reward functions used by the tests (loaded by file path, as a recipe would) -------------------


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def contains_reward(completions, word="yes", **kwargs):
    return [1.0 if word in c else None for c in completions]


def stamped_reward(completions, **kwargs):
    start = time.time()
    time.sleep(0.4)
    return RewardValues([1.0] * len(completions), components={"start": [start], "end": [time.time()]})


def spinning_reward(completions, pid_file, **kwargs):
    """CPU-bound and endless: the kind of call a thread cannot be made to stop."""
    Path(pid_file[0]).write_text(str(os.getpid()))
    while True:
        pass


def hanging_reward(completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(completions)


def failing_on_bad(completions, **kwargs):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score 'bad'")
    return [0.5] * len(completions)


def nan_reward(completions, **kwargs):
    return [math.nan if "nan" in c else 1.0 for c in completions]


def huge_reward(completions, **kwargs):
    return [(1e300 if c == "huge" else -1e300) if "huge" in c else 1.0 for c in completions]


def text_reward(completions, **kwargs):
    return ["high" for _ in completions]


def short_reward(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def contract_breaker(completions, **kwargs):
    raise RewardContractError("answered for an id it was never sent")


def group_echo(completions, group_id, **kwargs):
    # Each call must see exactly one group: all its rows share one group_id.
    assert len(set(group_id)) == 1, group_id
    return RewardValues(
        [float(group_id[0])] * len(completions),
        components={"doubled": [2.0 * group_id[0]] * len(completions)},
        counters={"calls": 1},
    )


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0.01)
    return [2.0 for _ in completions]


class CountingReward:
    """Built once per scorer; counts its calls."""

    reward_range = (0.0, 1.0)

    def __init__(self, bonus: float = 0.0):
        self.bonus = bonus
        self.calls = 0

    def __call__(self, completions, **kwargs):
        self.calls += 1
        return [self.bonus] * len(completions)


class CallNumber:
    """Scores every completion with the number of calls its instance has served."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completions, **kwargs):
        self.calls += 1
        return [float(self.calls)] * len(completions)


THREADS = ScoringConfig(isolation="thread")


def spec(name: str) -> str:
    return f"{HERE}:{name}"


def batch(completions, group_size=None):
    n = len(completions)
    rows = [{"group_id": (i // group_size if group_size else 0), "id": f"row-{i}"} for i in range(n)]
    return ["prompt"] * n, completions, [[1, 2]] * n, rows


# -- tests --------------------------------------------------------------------------------------------


def test_weighted_total_none_and_metrics():
    scorer = RewardScorer(
        [
            RewardConfig(fn=spec("length_reward"), weight=0.5),
            RewardConfig(fn=spec("contains_reward"), weight=2.0),
        ]
    )
    output = scorer.score(*batch(["yes", "no", "yes!"]))
    assert output.per_function["length_reward"] == [3.0, 2.0, 4.0]
    assert output.per_function["contains_reward"] == [1.0, None, 1.0]
    assert output.total == [0.5 * 3 + 2.0, 0.5 * 2, 0.5 * 4 + 2.0]
    assert output.metrics["reward/contains_reward/mean"] == 1.0
    assert output.metrics["reward/contains_reward/none_share"] == pytest.approx(1 / 3)
    # Bessel-corrected, as every std of a metrics row: [3, 2, 4] has mean 3 and squared deviations 1 + 0 + 1.
    assert output.metrics["reward/length_reward/std"] == pytest.approx(1.0)
    assert output.metrics["reward/contains_reward/std"] == 0.0
    assert output.failed == [False, False, False]


def test_kwargs_are_bound_and_checked_at_load():
    scorer = RewardScorer([RewardConfig(fn=spec("contains_reward"), kwargs={"word": "no"})])
    assert scorer.score(*batch(["yes", "no"])).per_function["contains_reward"] == [None, 1.0]
    with pytest.raises(
        RewardError, match=r"unknown kwargs \['wrod'\]; contains_reward takes \['completions', 'word'\]"
    ):
        RewardScorer([RewardConfig(fn=spec("contains_reward"), kwargs={"wrod": "no"})])
    with pytest.raises(RewardError, match="unexpected keyword argument 'nonexistent'"):
        RewardScorer([RewardConfig(fn=spec("CountingReward"), kwargs={"nonexistent": 1})])


def test_class_reward_is_built_once_with_kwargs():
    # In the trainer's threads the recipe's instance is the one called; worker processes: the next test.
    scorer = RewardScorer([RewardConfig(fn=spec("CountingReward"), kwargs={"bonus": 0.25})], THREADS)
    scorer.score(*batch(["a", "b", "c", "d"], group_size=2), group_size=2)
    scorer.score(*batch(["a", "b"]))
    instance = scorer.rewards[0].function
    assert instance.calls == 3  # two groups, then one batch: one instance throughout
    assert scorer.names == ["CountingReward"]


def test_a_worker_process_keeps_its_reward_instance_between_calls():
    scorer = RewardScorer([RewardConfig(fn=spec("CallNumber"))], ScoringConfig(concurrency=1))
    values = [scorer.score(*batch(["a", "b"]), group_size=1).total for _ in range(3)]
    assert values == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]  # one worker, one instance, built once
    scorer.close()


def test_calls_run_concurrently():
    """Overlap of the calls' own start / end times, not wall-clock bounds: true on a loaded machine too."""
    def intervals(concurrency: int) -> list[tuple[float, float]]:
        configs = [RewardConfig(fn=spec("stamped_reward"), name=f"slow{i}") for i in range(4)]
        scorer = RewardScorer(configs, ScoringConfig(concurrency=concurrency))
        scorer.score(*batch(["a"]))  # starts the workers, which is not what is measured
        output = scorer.score(*batch(["a"]))
        scorer.close()
        return sorted(
            (output.components[f"slow{i}/start"][0], output.components[f"slow{i}/end"][0]) for i in range(4)
        )

    together = intervals(4)
    assert max(start for start, _ in together) < min(end for _, end in together)  # all four ran at once
    one_by_one = intervals(1)
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(one_by_one))


def test_one_call_per_group_with_components_and_counters():
    scorer = RewardScorer([RewardConfig(fn=spec("group_echo"))])
    output = scorer.score(*batch(["a", "b", "c", "d", "e", "f"], group_size=3), group_size=3)
    assert output.per_function["group_echo"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert output.components["group_echo/doubled"] == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    assert output.metrics["reward/group_echo/calls"] == 2.0  # counters are summed over calls
    assert output.metrics["reward/group_echo/doubled/mean"] == 1.0
    with pytest.raises(RewardError, match="groups of 4"):
        scorer.score(*batch(["a"] * 6), group_size=4)


def test_async_reward_is_awaited():
    output = RewardScorer([RewardConfig(fn=spec("async_reward"))]).score(*batch(["a", "b"]))
    assert output.per_function["async_reward"] == [2.0, 2.0]


def test_timeout_counts_and_zero_policy():
    scorer = RewardScorer(
        [RewardConfig(fn=spec("hanging_reward"), timeout_s=0.3), RewardConfig(fn=spec("length_reward"))],
        ScoringConfig(on_error="zero"),
    )
    started = time.perf_counter()
    output = scorer.score(*batch(["ab", "abc"]))
    # The 30 s call was stopped, not waited for; the bound leaves room for starting the workers (not part of
    # a call's limit), which takes seconds on a loaded machine.
    assert time.perf_counter() - started < 15.0
    assert output.per_function["hanging_reward"] == [0.0, 0.0]
    assert output.total == [2.0, 3.0]
    assert output.metrics["reward/hanging_reward/timeouts"] == 1.0
    assert "timed out after 0.3 s" in output.errors[0]
    scorer.score(*batch(["ab"]))
    assert output.metrics["reward/hanging_reward/failures_total"] == 1.0
    assert scorer.failure_totals["hanging_reward"] == 2


def test_a_timed_out_call_really_stops(tmp_path):
    """Its worker is killed at the limit: nothing keeps spinning and slowing the steps after it."""
    pid_file = tmp_path / "pid"
    scorer = RewardScorer(
        [RewardConfig(fn=spec("spinning_reward"), timeout_s=0.5)], ScoringConfig(on_error="zero")
    )
    prompts, completions, ids, rows = batch(["a", "b"])
    rows = [{**row, "pid_file": str(pid_file)} for row in rows]
    for _ in range(3):
        started = time.monotonic()
        output = scorer.score(prompts, completions, ids, rows)
        assert output.metrics["reward/spinning_reward/timeouts"] == 1.0 and output.total == [0.0, 0.0]
        assert time.monotonic() - started < 30  # the limit plus starting a worker, even on a loaded machine
        worker = int(pid_file.read_text())
        assert worker != os.getpid()
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)  # gone, not abandoned
    scorer.close()


HUNGRY_REWARD = """
def hungry_reward(completions, **kwargs):
    hoard = bytearray(8 * 2**30)  # 8 GB: past the worker's cap
    return [float(len(hoard))] * len(completions)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]
"""


def test_a_reward_past_its_memory_cap_fails_alone(tmp_path):
    # In a file of their own: this test module imports torch, which needs more address space than the cap.
    (tmp_path / "hungry.py").write_text(HUNGRY_REWARD)
    rewards = tmp_path / "hungry.py"
    scorer = RewardScorer([
        RewardConfig(fn=f"{rewards}:hungry_reward"), RewardConfig(fn=f"{rewards}:length_reward")
    ],
                          ScoringConfig(on_error="zero", memory_mb=512))
    output = scorer.score(*batch(["ab"]))
    assert output.per_function == {"hungry_reward": [0.0], "length_reward": [2.0]}
    assert output.metrics["reward/hungry_reward/errors"] == 1.0 and "MemoryError" in output.errors[0]
    scorer.close()


def test_stop_policy_raises_with_the_function_name():
    scorer = RewardScorer(
        [RewardConfig(fn=spec("hanging_reward"), timeout_s=0.2)], ScoringConfig(on_error="stop")
    )
    with pytest.raises(RewardError, match=r"'hanging_reward' timed out .*on_error: stop"):
        scorer.score(*batch(["a"]))
    scorer = RewardScorer([RewardConfig(fn=spec("failing_on_bad"))])  # stop is the default
    with pytest.raises(RewardError, match="'failing_on_bad' raised ValueError: cannot score 'bad'"):
        scorer.score(*batch(["good", "bad"]))


def test_skip_group_marks_only_the_failing_group():
    scorer = RewardScorer(
        [RewardConfig(fn=spec("failing_on_bad")), RewardConfig(fn=spec("length_reward"))],
        ScoringConfig(on_error="skip_group"),
    )
    output = scorer.score(*batch(["ok", "ok", "bad", "ok"], group_size=2), group_size=2)
    assert output.failed == [False, False, True, True]
    assert output.per_function["failing_on_bad"] == [0.5, 0.5, None, None]
    assert output.metrics["reward/failing_on_bad/errors"] == 1.0
    assert output.metrics["reward/failed_share"] == 0.5


def test_nan_and_non_numbers_are_failures_naming_the_row():
    scorer = RewardScorer([RewardConfig(fn=spec("nan_reward"))])
    with pytest.raises(
        RewardError, match=r"returned nan for completion 1 \(row id='row-1'\); rewards must be finite"
    ):
        scorer.score(*batch(["a", "nan"]))
    zero = RewardScorer([RewardConfig(fn=spec("text_reward"))], ScoringConfig(on_error="zero"))
    output = zero.score(*batch(["a"]))
    assert output.per_function["text_reward"] == [0.0]
    assert output.metrics["reward/text_reward/invalids"] == 1.0
    assert "'high' (not a number)" in output.errors[0]


def test_an_overflowing_reward_is_a_failure_not_a_traceback():
    scorer = RewardScorer([RewardConfig(fn=spec("huge_reward"))], ScoringConfig(on_error="zero"))
    output = scorer.score(*batch(["huge", "small"], group_size=1), group_size=1)
    assert output.per_function["huge_reward"] == [0.0, 1.0]
    assert output.metrics["reward/huge_reward/invalids"] == 1.0
    assert (
        "returned 1e+300 for completion 0 (row id='row-0'); rewards beyond ±1e+12 overflow" in output.errors[
            0
        ]
    )
    with pytest.raises(RewardError, match="returned -1e\\+300"):
        RewardScorer([RewardConfig(fn=spec("huge_reward"))]).score(*batch(["-huge"]))


def test_wrong_length_and_contract_errors_stop_under_any_policy():
    for policy in ("zero", "skip_group"):
        scorer = RewardScorer([RewardConfig(fn=spec("short_reward"))], ScoringConfig(on_error=policy))
        with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
            scorer.score(*batch(["a", "b"]))
        scorer = RewardScorer([RewardConfig(fn=spec("contract_breaker"))], ScoringConfig(on_error=policy))
        with pytest.raises(RewardError, match="never sent"):
            scorer.score(*batch(["a"]))


def test_scoring_section_in_a_recipe(tmp_path):
    recipe = {
        "data": {"train": "x.jsonl"},
        "rewards": [{"fn": spec("length_reward"), "timeout_s": 5}],
        "scoring": {"concurrency": 2, "on_error": "skip_group"},
    }
    config = load_config(raw=recipe)
    assert config.scoring.on_error == "skip_group" and config.rewards[0].timeout_s == 5
    with pytest.raises(ConfigError, match=r"scoring\.on_error"):
        load_config(raw={**recipe, "scoring": {"on_error": "ignore"}})
    with pytest.raises(ConfigError, match=r"scoring\.retries: unknown field"):
        load_config(raw={**recipe, "scoring": {"retries": 3}})
