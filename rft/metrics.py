"""A step's metrics: each declared once, by name, with the way its parts pool; finished once a step.

A step is computed in parts (micro-batches, optimizer updates, dynamic-sampling rounds, processes),
and every metric of its row must equal its definition over the whole step, whatever the split. So a
part never holds a finished mean: it holds a numerator and its count (tokens, sequences, updates),
an extreme, or a count, sum and sum of squares; parts pool (`pool`), and the division happens once
(`finish`). The kinds, explicit on every metric:

- `SUM`: counts (errors, timeouts, tokens) add.
- `MEAN`: sum of the numerators / sum of the counts: a token share is weighted by tokens (the
  token-weighted mean), a mean over sequences by sequences, a mean over optimizer updates by updates.
- `MAX`, `MIN`: the extreme over every part (`MAX` of a time is the slowest process's).
- `STD`: `sample_std`, the Bessel-corrected standard deviation (divides by n - 1), the one convention
  of the whole row, as the advantages' (`rft.algorithms.advantages`), TRL and verl use; 0 for one value.

A mean or extreme over nothing (no counted token, no present reward) is left out of the row rather
than written as 0. This module is torch-free (report and monitors read it); the tensor side, which
keeps parts on the device until one reduction a step, is `rft.step_metrics`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Reduction(enum.Enum):
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    MIN = "min"
    STD = "std"


@dataclass(frozen=True)
class Metric:
    name: str
    reduction: Reduction


# ---------------------------------------------------------------- names (search for them here)
# Rollout and rewards (`rft.batch`).
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
REWARD_PREFIX = "reward"  # `describe`d: reward/mean, reward/std, reward/min, reward/max
OVERLONG_PENALTY = Metric("reward/overlong/mean", Reduction.MEAN)
ADVANTAGE_PREFIX = "advantage"
LENGTH_PREFIX = "completion/length"
LENGTH_MEAN = "completion/length/mean"
LENGTH_STD = "completion/length/std"
LENGTH_MIN = "completion/length/min"
LENGTH_MAX = "completion/length/max"
ZERO_VARIANCE_SHARE = "groups/zero_variance_share"
DYNAMIC_ROUNDS = "dynamic_sampling/rounds"
DYNAMIC_PASS_RATE = "dynamic_sampling/pass_rate"
DYNAMIC_GROUPS = "dynamic_sampling/groups"
TRUNCATED_SHARE = Metric("completion/truncated_share", Reduction.MEAN)
COMPLETION_TOKENS = Metric("completion/tokens", Reduction.SUM)
# Agent episodes (`rft.agents.episodes`): per trajectory, except tool failures (per call).
AGENT_TURNS = Metric("agent/turns", Reduction.MEAN)
AGENT_TOOL_CALLS = Metric("agent/tool_calls", Reduction.MEAN)
AGENT_TOOL_FAILURES = Metric("agent/tool_failure_share", Reduction.MEAN)
AGENT_ENVIRONMENT_FAILURES = Metric("agent/environment_failure_share", Reduction.MEAN)
AGENT_ENVIRONMENT_TOKENS = Metric("agent/environment_tokens", Reduction.MEAN)
ENVIRONMENT_REWARD = Metric("reward/environment/mean", Reduction.MEAN)
# The update (`rft.update`): token means and shares over the counted tokens of every micro-batch.
LOSS = Metric("loss", Reduction.MEAN)  # mean over the step's optimizer updates of each update's loss
GRAD_NORM = Metric("grad_norm", Reduction.MEAN)  # over updates
LEARNING_RATE = Metric("learning_rate", Reduction.MEAN)  # over updates
ENTROPY = Metric("entropy", Reduction.MEAN)
KL_OLD = Metric("kl/old", Reduction.MEAN)  # k3 estimate of KL(pi_theta || pi_old)
KL_REF = Metric("kl/ref", Reduction.MEAN)  # the loss's estimator of KL(pi_theta || pi_ref)
CLIP_LOW = Metric("clip/clip_low", Reduction.MEAN)
CLIP_HIGH = Metric("clip/clip_high", Reduction.MEAN)
CLIP_REGION = Metric("clip/clip_region", Reduction.MEAN)
RATIO_MEAN = Metric("policy/ratio_mean", Reduction.MEAN)
RATIO_MAX = Metric("policy/ratio_max", Reduction.MAX)
MISMATCH_ABS_MEAN = Metric("rollout/mismatch_abs_mean", Reduction.MEAN)
MISMATCH_RATIO_MAX = Metric("rollout/mismatch_ratio_max", Reduction.MAX)
TIS_CAPPED_SHARE = Metric("rollout/tis_capped_share", Reduction.MEAN)  # weight truncated (*_truncate modes)
ROLLOUT_MASKED_SHARE = Metric("rollout/masked_share", Reduction.MEAN)  # dropped by a *_mask / icepop mode
ROLLOUT_KL = Metric("rollout/kl", Reduction.MEAN)  # k3 estimate of KL(pi_rollout || pi_trainer)
ENTROPY_KEPT_SHARE = Metric("entropy/kept_share", Reduction.MEAN)  # kept by algorithm.top_entropy_quantile
CLIP_PREFIX = "clip"
KL_PREFIX = "kl"
UPDATE_SKIPPED = "update/skipped"
# The step (`rft.trainer`): phases timed by `rft.timing.marked_timer`, and the machine.
TIME_GENERATION = "time/generation"
TIME_REWARD = "time/reward"
TIME_LOGPROBS = "time/logprobs"
TIME_UPDATE = "time/update"
TIME_WEIGHT_SYNC = "time/weight_sync"
TIME_STEP = "time/step"
TOKENS_PER_S = "throughput/tokens_per_s"
PEAK_MEMORY_MB = "memory/peak_mb"


def reward_key(name: str, *parts: str) -> str:
    """A reward function's metric name: `reward/<name>/<part>` (mean, std, none_share, failures_total...)."""
    return "/".join((REWARD_PREFIX, name, *parts))


def reward_name(key: str) -> str | None:
    """The reward function whose mean `key` is (`reward/<name>/mean`), or None for any other metric."""
    prefix, suffix = f"{REWARD_PREFIX}/", "/mean"
    if key == REWARD_MEAN or not (key.startswith(prefix) and key.endswith(suffix)):
        return None
    return key.removeprefix(prefix).removesuffix(suffix)


def described(prefix: str, *, extremes: bool = True, std: bool = True) -> tuple[Metric, ...]:
    """The metrics a description of values writes under `prefix`: mean, std, min, max."""
    metrics = [Metric(f"{prefix}/mean", Reduction.MEAN)]
    if std:
        metrics.append(Metric(f"{prefix}/std", Reduction.STD))
    if extremes:
        metrics += [Metric(f"{prefix}/min", Reduction.MIN), Metric(f"{prefix}/max", Reduction.MAX)]
    return tuple(metrics)


# ---------------------------------------------------------------- pooling and finishing parts
def sample_std(n: float, total: float, squares: float) -> float | None:
    """The row's one std convention: Bessel-corrected (n - 1) from count, sum and sum of squares.

    None for no value, 0 for one. In float64: sum of squares minus n mean^2, divided by n - 1.
    """
    if n < 1:
        return None
    return math.sqrt(max(0.0, squares - total * total / n) / (n - 1)) if n > 1 else 0.0


def pool(kind: Reduction, a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Two parts of one metric as one: extremes keep the larger slot (MIN holds -min), the rest add.

    Slots may be floats or 0-dim tensors (`rft.step_metrics` keeps them on the device); `max` of
    tensors is left to the caller, which knows the device.
    """
    if kind in (Reduction.MAX, Reduction.MIN):
        return [max(a[0], b[0])]
    return [x + y for x, y in zip(a, b, strict=True)]


def finish(kind: Reduction, part: Sequence[float]) -> float | None:
    """A metric's value from its pooled part (host floats); None when nothing was counted."""
    if kind is Reduction.SUM:
        return part[0]
    if kind is Reduction.MEAN:
        numerator, count = part
        return numerator / count if count > 0 else None
    if kind is Reduction.STD:
        return sample_std(*part)
    if math.isinf(part[0]) and part[0] < 0:
        return None  # nothing was counted in any part
    return part[0] if kind is Reduction.MAX else -part[0]

