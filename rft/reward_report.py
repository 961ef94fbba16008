"""What `rft reward check` reports: each reward's statistics, flat groups, samples, and plain warnings.

`summarize(totals, per_function, ...)` (or `summarize_scores` for a scored batch) gives a
`CheckReport`: each reward's mean, spread and range, the share of groups whose total reward does
not vary (GRPO learns nothing from them: every advantage is 0), the truncated share, a few sampled
completions with their scores, and warnings when the base model already scores near the maximum
(RFT may not be needed) or near the minimum everywhere (the reward may be unreachable: then the
numbers' likeliest cause is named, truncation, a missing column or the answer format).
`format_report` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rft.reward_context import conversation_text
from rft.scoring import RewardScorer, ScoreOutput

NEAR_MAX = 0.9  # mean total above this share of the range: the base model already does well
NEAR_MIN = 0.05  # every total below this share of the range: nothing to learn from
ZERO_VARIANCE_WARN = 0.5  # share of groups without signal that deserves a warning
_VARIANCE_EPS = 1e-9
SAMPLE_CHARS = 200  # of a sample's prompt and completion shown, on one line


@dataclass
class RewardStats:
    name: str
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    none_share: float
    zero_variance_share: float | None  # over groups of two or more scored completions


@dataclass
class Sample:
    """One sampled completion as the report shows it: why it scored what it scored."""

    prompt: str
    completion: str
    truncated: bool
    scores: dict[str, float | None]  # reward name (and "total") -> value


@dataclass
class CheckReport:
    groups: int
    completions: int
    rewards: list[RewardStats]
    total: RewardStats
    reward_range: tuple[float, float] | None
    failed_share: float
    truncated_share: float | None = None  # completions cut at max_new_tokens (sampled mode)
    samples: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(name: str, groups: Sequence[Sequence[float | None]]) -> RewardStats:
    values = [v for group in groups for v in group if v is not None]
    count = sum(len(group) for group in groups)
    scored_groups = [[v for v in group if v is not None] for group in groups]
    scored_groups = [group for group in scored_groups if len(group) >= 2]
    zero_variance = (
        sum(1 for group in scored_groups if max(group) - min(group) <= _VARIANCE_EPS) / len(scored_groups)
        if scored_groups
        else None
    )
    if not values:
        return RewardStats(name, None, None, None, None, 1.0 if count else 0.0, zero_variance)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return RewardStats(name, mean, std, min(values), max(values), 1 - len(values) / count, zero_variance)


def summarize(
    totals: Sequence[Sequence[float]],
    per_function: dict[str, Sequence[Sequence[float | None]]],
    reward_range: tuple[float, float] | None = None,
    failed_share: float = 0.0,
    truncated_share: float | None = None,
    samples: Sequence[Sample] = (),
) -> CheckReport:
    """Statistics and warnings for scores grouped by prompt: `totals[g][i]` is the total reward of
    completion i of group g, `per_function[name][g][i]` that function's value."""
    total = _stats("total", totals)
    report = CheckReport(
        groups=len(totals),
        completions=sum(len(group) for group in totals),
        rewards=[_stats(name, groups) for name, groups in per_function.items()],
        total=total,
        reward_range=reward_range,
        failed_share=failed_share,
        truncated_share=truncated_share,
        samples=list(samples),
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: CheckReport) -> list[str]:
    warnings = []
    total = report.total
    if total.mean is None:
        return ["No completion received a reward: check that the rewards apply to these rows."]
    if report.reward_range is not None:
        low, high = report.reward_range
        span = high - low
        if span > 0 and total.mean >= low + NEAR_MAX * span:
            warnings.append(
                f"The base model already scores {total.mean:.3f} on average (maximum {high:g}): "
                "RFT may not be needed. Harder prompts or a stricter reward would leave room to learn."
            )
        if span > 0 and total.max is not None and total.max <= low + NEAR_MIN * span:
            warnings.append(
                f"No completion scored above {total.max:.3f} (minimum {low:g}, maximum {high:g}): "
                f"the reward may be unreachable. {_likely_cause(report)}"
            )
    elif total.max is not None and total.max <= 0.0:
        warnings.append(
            f"No completion scored above 0: the reward may be unreachable. {_likely_cause(report)}"
        )
    if total.zero_variance_share is not None and total.zero_variance_share >= ZERO_VARIANCE_WARN:
        warnings.append(
            f"{total.zero_variance_share:.0%} of groups have the same total reward for every completion: "
            "they teach nothing (advantages are 0). More completions per prompt, a higher temperature, "
            "partial credit, or DAPO's dynamic sampling help."
        )
    if report.failed_share > 0:
        warnings.append(f"{report.failed_share:.0%} of completions had a failed reward call.")
    return warnings


def _likely_cause(report: CheckReport) -> str:
    """What the numbers point to when nothing scores: truncation, a reward that never applies, or the
    format."""
    if report.truncated_share is not None and report.truncated_share >= 0.5:
        return (f"Likely cause: truncation, {report.truncated_share:.0%} of completions were cut at the "
                "token limit before their answer; raise rollout.max_new_tokens.")
    absent = [stats.name for stats in report.rewards if stats.none_share >= 1.0]
    if absent:
        return (f"Likely cause: a column, {', '.join(absent)} returned None (not applicable) for every "
                "completion; check the columns it reads against the rows' fields.")
    return ("Likely cause: the format, the completions end but none has what the rewards look for; "
            "compare the samples below with the answer format the prompt asks for, and check the reward "
            "on hand-written answers (--completions).")


def pick_samples(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    truncated: Sequence[bool],
    output: ScoreOutput,
    per_reward: int = 2,
) -> list[Sample]:
    """For each reward, its highest- and lowest-scored completions (at most `per_reward`, no repeats)."""
    chosen: list[int] = []
    for values in output.per_function.values():
        scored = sorted((v, i) for i, v in enumerate(values) if v is not None)
        ends = [scored[-1][1], scored[0][1]] if scored else []
        chosen += [i for i in ends[:per_reward] if i not in chosen]
    return [
        Sample(
            prompt=_text(prompts[i]), completion=_text(completions[i]), truncated=bool(truncated[i]),
            scores={**{name: values[i] for name, values in output.per_function.items()},
                    "total": output.total[i]},
        )
        for i in chosen
    ]


def _text(value: Any) -> str:
    """A prompt's or completion's text for display: a message list shows its last message's content, an
    agent's conversation (several messages from the assistant's first) every message."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        if len(value) > 1 and value[0].get("role") == "assistant":
            return conversation_text(value)
        return str(value[-1].get("content", ""))
    return str(value)


def summarize_scores(
    output: ScoreOutput,
    group_sizes: Sequence[int],
    reward_range: tuple[float, float] | None = None,
    truncated_share: float | None = None,
    samples: Sequence[Sample] = (),
) -> CheckReport:
    """`summarize` for a scored batch whose completions are consecutive groups of the given sizes."""
    if sum(group_sizes) != len(output.total):
        raise ValueError(
            f"group sizes add up to {sum(group_sizes)}, but {len(output.total)} completions were scored"
        )
    bounds = []
    start = 0
    for size in group_sizes:
        bounds.append((start, start + size))
        start += size
    totals = [output.total[a:b] for a, b in bounds]
    per_function = {name: [values[a:b] for a, b in bounds] for name, values in output.per_function.items()}
    failed_share = sum(output.failed) / len(output.failed) if output.failed else 0.0
    return summarize(totals, per_function, reward_range, failed_share, truncated_share, samples)


def recipe_reward_range(scorer: RewardScorer) -> tuple[float, float] | None:
    """The total reward's range from the functions' `reward_range` and the weights, when every
    function declares one (the library's do; a user's function may set the attribute)."""
    low = high = 0.0
    for _, weight, function in scorer.functions:
        # A recipe's kwargs wrap the reward in functools.partial: its declaration sits on `.func`.
        declared = getattr(function, "reward_range", None)
        declared = declared or getattr(getattr(function, "func", None), "reward_range", None)
        if declared is None:
            return None
        ends = (weight * declared[0], weight * declared[1])
        low += min(ends)
        high += max(ends)
    return low, high


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: CheckReport) -> str:
    """The report as the lines `rft reward check` prints."""
    lines = [f"{report.completions} completions in {report.groups} groups", ""]
    header = f"{'reward':<28} {'mean':>7} {'std':>7} {'min':>7} {'max':>7} {'n/a':>6} {'flat groups':>12}"
    lines.append(header)
    for stats in [*report.rewards, report.total]:
        flat = "-" if stats.zero_variance_share is None else f"{stats.zero_variance_share:.0%}"
        lines.append(
            f"{stats.name:<28} {format_value(stats.mean):>7} {format_value(stats.std):>7} "
            f"{format_value(stats.min):>7} {format_value(stats.max):>7} {stats.none_share:>6.0%} {flat:>12}"
        )
    lines.append("")
    if report.reward_range is None:
        lines.append("Total reward range unknown (a reward declares none): pass --reward-range LOW HIGH to "
                     "check for a base model that already aces the task.")
    else:
        lines.append(f"Total reward range: {report.reward_range[0]:g} .. {report.reward_range[1]:g}")
    if report.truncated_share is not None:
        lines.append(f"Truncated at max_new_tokens: {report.truncated_share:.0%} of completions")
    lines.extend(f"WARNING: {warning}" for warning in report.warnings)
    if not report.warnings:
        lines.append("No warnings.")
    if report.samples:
        lines += ["", "Samples (each reward's highest- and lowest-scored completions):"]
    for sample in report.samples:
        scores = "  ".join(f"{name}={format_value(value)}" for name, value in sample.scores.items())
        lines.append(f"- {scores}{'  (truncated)' if sample.truncated else ''}")
        lines.append(f"  prompt:     {_clip(sample.prompt)}")
        lines.append(f"  completion: {_clip(sample.completion)}")
    return "\n".join(lines)


def _clip(text: str, limit: int = SAMPLE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
