"""A rubric: a weighted sum of reward components, each logged on its own.

Recipe (the "+1 grounded, +1 schema, +1 safe, +1 concise, -1 violation" example)::

    rewards:
      - fn: rewards.rubric:Rubric
        name: support_rubric
        kwargs:
          components:
            - {name: grounded, fn: rewards.grounding:cited_sources, weight: 1, kwargs: {penalty: 0}}
            - {name: schema, fn: rewards.structured:JsonSchemaReward, weight: 1,
               kwargs: {schema_file: schema.json}}
            - {name: safe, fn: rewards.policy:PIIEcho, weight: 1,
               kwargs: {clean_score: 1, violation_score: 0}}
            - {name: concise, fn: rewards.text:length_band, weight: 1, kwargs: {max: 150}}
            - {name: violation, fn: rewards.policy:blocked_terms, weight: 1,
               kwargs: {terms: [guarantee], violation_score: -1}}

Each component is any reward (`fn` as in a recipe, optional `kwargs`, `weight` default 1, `name`
default the function's name). A component's None (not applicable) adds 0. The rubric returns the
weighted sum and reports every component's values (`reward/<rubric>/<component>/mean` in the
metrics), and the components' own components and counters under `<component>.<key>`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.base import RewardContractError, RewardValues
from rewards.loading import build_reward


class Rubric:
    def __init__(self, components: Sequence[Mapping[str, Any]], normalize: bool = False):
        if not components:
            raise ValueError("Rubric: `components` is empty")
        self.__name__ = "rubric"
        self.normalize = normalize
        self.components: list[tuple[str, float, Any]] = []
        for index, spec in enumerate(components):
            unknown = set(spec) - {"fn", "name", "weight", "kwargs"}
            if "fn" not in spec or unknown:
                raise ValueError(
                    f"Rubric component {index}: needs `fn` and may have name, weight, kwargs"
                    + (f"; unknown {sorted(unknown)}" if unknown else "")
                )
            default_name, function = build_reward(str(spec["fn"]), dict(spec.get("kwargs") or {}))
            name = str(spec.get("name") or default_name)
            self.components.append((name, float(spec.get("weight", 1.0)), function))
        names = [name for name, _, _ in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"Rubric component names must be unique, got {names}")
        self.total_weight = sum(abs(weight) for _, weight, _ in self.components)

    @property
    def reward_range(self) -> tuple[float, float] | None:
        """The sum of the components' ranges scaled by their weights, when every component declares one."""
        low = high = 0.0
        for _, weight, function in self.components:
            component_range = getattr(getattr(function, "func", function), "reward_range", None)
            if component_range is None:
                return None
            ends = (weight * component_range[0], weight * component_range[1])
            low += min(ends)
            high += max(ends)
        if self.normalize:
            return low / self.total_weight, high / self.total_weight
        return low, high

    def __call__(self, completions: list[Any], **columns: Any) -> RewardValues:
        total = [0.0] * len(completions)
        parts: dict[str, list[float | None]] = {}
        counters: dict[str, float] = {}
        for name, weight, function in self.components:
            values = function(completions=completions, **columns)
            if inspect.isawaitable(values):
                values = asyncio.run(values)
            if not isinstance(values, list | tuple):
                raise RewardContractError(
                    f"rubric component {name!r} returned {type(values).__name__}, expected a list"
                )
            if len(values) != len(completions):
                raise RewardContractError(
                    f"rubric component {name!r} returned {len(values)} values for {len(completions)} "
                    "completions"
                )
            parts[name] = [None if v is None else float(v) for v in values]
            for i, value in enumerate(parts[name]):
                if value is not None:
                    total[i] += weight * value
            if isinstance(values, RewardValues):
                parts.update({f"{name}.{key}": series for key, series in values.components.items()})
                counters.update({f"{name}.{key}": count for key, count in values.counters.items()})
        if self.normalize:
            total = [value / self.total_weight for value in total]
        return RewardValues(total, components=parts, counters=counters)
