"""Statistics of held-out scores and the one noise rule that says whether a change is real. Torch-free.

A score is summarised as a `Stat`: mean, standard error of the mean (sample std / sqrt(n)) and count.
A change from `before` to `after` is "larger than its noise" when

    |after - before| > sigmas x sqrt(se_before^2 + se_after^2)   (the two-sample standard error),

`sigmas` being `eval.noise_sigmas` (default 2). With fewer than 2 values on a side there is no noise
estimate and nothing is called larger than noise. `rft eval`, `rft train`'s last line, the report,
the monitors and early stopping all decide through `compare_stats` and word the outcome through
`Comparison.verdict`. Before and after share prompts, so this error is conservative (it ignores their
positive correlation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OVERALL_METRIC = "reward"  # the headline metric: the recipe's weighted reward


@dataclass(frozen=True)
class Stat:
    """Mean, standard error of the mean (sample std / sqrt(n)) and count."""

    mean: float
    stderr: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        mean, stderr = mean_and_stderr(list(values))
        return cls(mean, stderr, len(values))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "count": self.count}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from `samples` completions of which `correct` pass (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a pass."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


@dataclass(frozen=True)
class Comparison:
    """One metric before and after (overall, or on one slice value), with its noise and the rule's outcome.

    `stderr` is the two-sample standard error; `z` the change in those units (None without a noise
    estimate); `significant` means |z| > `sigmas`.
    """

    metric: str
    tag: str | None
    value: str | None
    before: Stat
    after: Stat
    change: float
    stderr: float
    z: float | None
    significant: bool
    sigmas: float

    @property
    def better(self) -> bool:
        return self.significant and self.change > 0

    @property
    def worse(self) -> bool:
        return self.significant and self.change < 0

    @property
    def verdict(self) -> str:
        """The rule's outcome in the one wording the CLI, the tables and the report share."""
        if self.z is None:
            return "too few prompts to tell"
        z = "+inf" if self.z == math.inf else "-inf" if self.z == -math.inf else f"{self.z:+.1f}"
        if self.significant:
            return f"{'better' if self.change > 0 else 'worse'} ({z} s.e. > {self.sigmas:g})"
        return f"within noise ({z} s.e. ≤ {self.sigmas:g})"

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON (the manifest's `before_after`, `rft eval --output`, summary.json)."""
        return {
            "metric": self.metric, "tag": self.tag, "value": self.value,
            "before": self.before.to_dict(), "after": self.after.to_dict(), "change": self.change,
            "stderr": self.stderr, "z": self.z, "significant": self.significant,
        }


def compare_stats(
    before: Stat, after: Stat, sigmas: float, metric: str = OVERALL_METRIC, tag: str | None = None,
    value: str | None = None,
) -> Comparison:
    """The noise rule (module docstring) applied to one metric."""
    change = after.mean - before.mean
    stderr = math.hypot(before.stderr, after.stderr)
    z: float | None
    if before.count < 2 or after.count < 2:
        z = None
    elif stderr > 0:
        z = change / stderr
    else:
        z = 0.0 if change == 0 else math.copysign(math.inf, change)
    significant = z is not None and abs(z) > sigmas
    return Comparison(metric, tag, value, before, after, change, stderr, z, significant, sigmas)


def _stats(stats: dict[str, Any]) -> dict[str, Stat]:
    return {metric: stat if isinstance(stat, Stat) else Stat(**stat) for metric, stat in stats.items()}


def compare(before: dict[str, Any], after: dict[str, Any], sigmas: float) -> list[Comparison]:
    """Every metric present in both summaries (`EvalResult.summary()`), overall then per slice value."""
    rows = []
    after_stats = _stats(after["stats"])
    for metric, stat in _stats(before["stats"]).items():
        if metric in after_stats:
            rows.append(compare_stats(stat, after_stats[metric], sigmas, metric))
    for tag, values in before.get("slices", {}).items():
        for value, stats in values.items():
            after_slice = _stats(after.get("slices", {}).get(tag, {}).get(value, {}))
            rows += [compare_stats(stat, after_slice[metric], sigmas, metric, tag, value)
                     for metric, stat in _stats(stats).items() if metric in after_slice]
    return rows


def overall(rows: Sequence[Comparison]) -> Comparison | None:
    """The headline row of a `compare`: the reward over every prompt."""
    return next((row for row in rows if row.metric == OVERALL_METRIC and row.tag is None), None)


def reward_change(before: dict[str, Any], after: dict[str, Any], sigmas: float) -> Comparison:
    """The headline comparison of two evaluation summaries: the reward over every prompt."""
    reward = OVERALL_METRIC
    return compare_stats(Stat(**before["stats"][reward]), Stat(**after["stats"][reward]), sigmas)


def overall_change(before: dict[str, Any], after: dict[str, Any], sigmas: float) -> str:
    """One line: the held-out reward before -> after, its change and the noise rule's verdict."""
    row = reward_change(before, after, sigmas)
    b, a = row.before, row.after
    return (
        f"{b.mean:.3f} ± {b.stderr:.3f} -> {a.mean:.3f} ± {a.stderr:.3f} (n={a.count}; "
        f"change {row.change:+.3f}, {row.verdict})"
    )


def format_comparison(rows: Sequence[Comparison], slice_metrics: Sequence[str] = (OVERALL_METRIC,)) -> str:
    """A plain-text before / after table: every metric overall, then `slice_metrics` per slice value."""
    sliced = [r for r in rows if r.tag is not None and r.metric in slice_metrics]
    shown = [r for r in rows if r.tag is None] + sliced
    wheres = [f"{r.tag}={r.value}" if r.tag else "(all)" for r in shown]
    metric_width = max([len("metric"), *(len(r.metric) for r in shown)])
    where_width = max([len("slice"), *(len(w) for w in wheres)])
    header = f"{'metric':<{metric_width}} {'slice':<{where_width}} {'before':>15} {'after':>15} {'change':>8}"
    lines = [f"{header} {'s.e.':>6}  verdict"]
    for row, where in zip(shown, wheres, strict=True):
        b, a = row.before, row.after
        lines.append(
            f"{row.metric:<{metric_width}} {where:<{where_width}} {b.mean:>7.3f} ± {b.stderr:<5.3f} "
            f"{a.mean:>7.3f} ± {a.stderr:<5.3f} {row.change:>+8.3f} {row.stderr:>6.3f}  {row.verdict}"
        )
    return "\n".join(lines)
