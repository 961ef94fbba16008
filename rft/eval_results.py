"""What one evaluation pass reports: `EvalResult`, built from per-prompt values, and its plain forms.

Per prompt, a pass records `reward`, `reward/<fn>`, `exact_match`, `pass@k` and `metric/<name>` (its
several samples averaged first, so that the errors count prompts, not correlated samples); the
result holds each as a `Stat` over prompts, overall and per value of every slice tag. `summary()` is
the JSON that evaluations.jsonl, the manifest, the monitors and the report read. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rft.data import Example
from rft.eval_plans import EvalPlan, tag_value
from rft.stats import Stat

SliceStats = dict[str, dict[str, dict[str, Stat]]]  # tag -> value -> metric -> Stat


@dataclass
class EvalResult:
    label: str
    mode: str
    stats: dict[str, Stat]
    slices: SliceStats
    rewards: list[float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def mean(self) -> float:
        return self.stats["reward"].mean

    @property
    def stderr(self) -> float:
        return self.stats["reward"].stderr

    @property
    def count(self) -> int:
        return self.stats["reward"].count

    @property
    def per_function(self) -> dict[str, float]:
        return {
            key.split("/", 1)[1]: stat.mean for key, stat in self.stats.items() if key.startswith("reward/")
        }

    def summary(self) -> dict[str, Any]:
        """Scores as plain JSON (what evaluations.jsonl, the manifest and the report hold)."""
        return {
            "label": self.label, "mode": self.mode, "mean": self.mean, "stderr": self.stderr,
            "count": self.count, "per_function": self.per_function,
            "stats": _stat_dicts(self.stats),
            "slices": {
                tag: {value: _stat_dicts(stats) for value, stats in values.items()}
                for tag, values in self.slices.items()
            },
            "settings": self.settings, "cached": self.cached,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rewards": self.rewards, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(
            label=data["label"], mode=data["mode"],
            stats=_stats_of(data["stats"]),
            slices={
                tag: {value: _stats_of(stats) for value, stats in values.items()}
                for tag, values in data["slices"].items()
            },
            rewards=data["rewards"], samples=data["samples"], settings=data["settings"],
            cached=data.get("cached", False),
        )

    def tracker_metrics(self) -> dict[str, float]:
        """Flat `eval/<mode>/<metric>` values for logs and experiment trackers."""
        metrics: dict[str, float] = {}
        for key, stat in self.stats.items():
            metrics[f"eval/{self.mode}/{key}"] = stat.mean
            metrics[f"eval/{self.mode}/{key}_stderr"] = stat.stderr
        return metrics


def _stat_dicts(stats: dict[str, Stat]) -> dict[str, dict[str, Any]]:
    return {key: stat.to_dict() for key, stat in stats.items()}


def _stats_of(dicts: dict[str, dict[str, Any]]) -> dict[str, Stat]:
    return {key: Stat(**stat) for key, stat in dicts.items()}


def _stats_over(per_prompt: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, Stat]:
    """A Stat per key, over the prompts that have a value for it (a key none has is left out)."""
    present = [key for key in keys if any(key in v for v in per_prompt)]
    return {key: Stat.of([v[key] for v in per_prompt if key in v]) for key in present}


def slice_stats(
    examples: Sequence[Example], per_prompt: Sequence[dict[str, float]], slices: Sequence[str],
    keys: Sequence[str],
) -> SliceStats:
    """Per slice tag and value: the Stats of the prompts filed under it (a prompt without the tag in none)."""
    stats: SliceStats = {}
    for tag in slices:
        groups: dict[str, list[dict[str, float]]] = {}
        for example, values in zip(examples, per_prompt, strict=True):
            value = tag_value(example.row.get(tag))
            if value is not None:
                groups.setdefault(value, []).append(values)
        stats[tag] = {value: _stats_over(group, keys) for value, group in sorted(groups.items())}
    return stats


def summarise(
    label: str, plan: EvalPlan, examples: Sequence[Example], per_prompt: Sequence[dict[str, float]],
    slices: Sequence[str], samples: list[dict[str, Any]],
) -> EvalResult:
    """An `EvalResult` from each prompt's values (`examples[i]` scored `per_prompt[i]`); the reward first."""
    keys = sorted({key for values in per_prompt for key in values}, key=lambda k: (k != "reward", k))
    return EvalResult(
        label=label, mode=plan.mode, stats=_stats_over(per_prompt, keys),
        slices=slice_stats(examples, per_prompt, slices, keys), rewards=[v["reward"] for v in per_prompt],
        samples=samples, settings=plan.settings(),
    )


def format_result(result: EvalResult) -> str:
    """Every metric of one pass, then the reward per slice value."""
    names = [*result.stats, *(f"{tag}={value}" for tag, values in result.slices.items() for value in values)]
    width = max(len(name) for name in names)
    lines = [f"[{result.label}] {result.mode}, n={result.count}{' (cached)' if result.cached else ''}"]
    for key, stat in result.stats.items():
        lines.append(f"  {key:<{width}}  {stat.mean:.3f} ± {stat.stderr:.3f}")
    for tag, values in result.slices.items():
        for value, stats in values.items():
            reward = stats["reward"]
            where = f"{tag}={value}"
            lines.append(
                f"  {where:<{width}}  {reward.mean:.3f} ± {reward.stderr:.3f} reward (n={reward.count})"
            )
    return "\n".join(lines)
