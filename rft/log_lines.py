"""Metrics as plain log lines, for consoles that read them from a job's log (SageMaker's MetricDefinitions).

With `output.log_every: N` the trainer prints, every N steps, one line such as

    step 12/200: reward/mean=0.4125 reward/std=0.2311 reward/math_answer/mean=0.5 loss=-0.00317 ...

and every held-out evaluation prints `held-out [step-10, greedy] mean reward 0.412 ± 0.031 (n=50)`.
The regexes below match one value each in those lines. They use only what every regex dialect
reads alike (literal text, character classes, one capturing group), since the console, not Python,
applies them; a value that is not finite (nan, inf) matches nothing, so the point is left out
rather than plotted as a wrong number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rft.metrics import (
    ENTROPY,
    GRAD_NORM,
    KL_OLD,
    KL_REF,
    LEARNING_RATE,
    LENGTH_MEAN,
    LOSS,
    REWARD_MEAN,
    REWARD_STD,
    TIME_STEP,
    TRUNCATED_SHARE,
    ZERO_VARIANCE_SHARE,
    reward_key,
)

# The step metrics a line carries (when the step has them), with each reward's mean after reward/std.
STEP_LINE_METRICS = (
    REWARD_MEAN, REWARD_STD, LOSS.name, KL_OLD.name, KL_REF.name, ENTROPY.name, GRAD_NORM.name,
    LEARNING_RATE.name, LENGTH_MEAN, TRUNCATED_SHARE.name, ZERO_VARIANCE_SHARE, TIME_STEP,
)
EVAL_MODES = ("greedy", "sampled")
_NUMBER = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"


def line_metric_names(reward_names: Sequence[str]) -> list[str]:
    """The metric names of a step line, in their order, for rewards with these names."""
    components = [reward_key(name, "mean") for name in reward_names]
    return [*STEP_LINE_METRICS[:2], *components, *STEP_LINE_METRICS[2:]]


def step_line(step: int, total: int, metrics: Mapping[str, float], reward_names: Sequence[str]) -> str:
    names = [name for name in line_metric_names(reward_names) if name in metrics]
    values = " ".join(f"{name}={metrics[name]:.6g}" for name in names)
    return f"step {step}/{total}: {values}"


def held_out_line(label: str, mode: str, mean: float, stderr: float, count: int, cached: bool) -> str:
    cached_note = " (cached baseline)" if cached else ""
    return f"held-out [{label}, {mode}] mean reward {mean:.3f} ± {stderr:.3f} (n={count}){cached_note}"


def step_metric_regex(name: str) -> str:
    """Matches `name`'s value in a step line (the space before it keeps `reward/mean` from
    `x/reward/mean`)."""
    return rf"step [0-9]+/[0-9]+:.* {re.escape(name)}={_NUMBER}"


def held_out_regex(mode: str) -> str:
    return rf"held-out \[[^,]+, {mode}\] mean reward {_NUMBER}"
