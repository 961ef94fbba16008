"""Run reward functions: load them by spec, call them with the TRL signature, weight and check them.

A reward function is `fn(completions: list, **columns) -> list[float | None]`. It receives
`prompts`, `completions`, `completion_ids` and every dataset column as lists aligned with the
completions. `None` means "not applicable": excluded from that function's mean and contributing 0
to the weighted sum.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.config import RewardConfig

RewardFunction = Callable[..., list[float | None]]


class RewardError(RuntimeError):
    """A reward function failed in a way the run cannot continue from."""


def load_function(spec: str) -> Callable[..., Any]:
    """Import `path/to/file.py:function` or `package.module:function`."""
    if ":" not in spec:
        raise RewardError(f"reward {spec!r}: expected 'file.py:function' or 'package.module:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {target} not found")
        module_name = f"rft_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RewardError(f"reward {spec!r}: cannot import {target}: {exc}") from exc
    if not hasattr(module, name):
        raise RewardError(f"reward {spec!r}: {target} has no function {name!r}")
    return getattr(module, name)


@dataclass
class ScoreOutput:
    total: list[float]
    per_function: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardScorer:
    """Calls every configured reward function on a batch and combines them with their weights."""

    def __init__(self, configs: Sequence[RewardConfig]):
        self.functions: list[tuple[str, float, RewardFunction]] = []
        for config in configs:
            function = load_function(config.fn)
            name = config.name or getattr(function, "__name__", config.fn.rsplit(":", 1)[1])
            if config.kwargs:
                function = functools.partial(function, **config.kwargs)
            self.functions.append((name, config.weight, function))
        names = [name for name, _, _ in self.functions]
        if len(set(names)) != len(names):
            raise RewardError(f"reward names must be unique, got {names}; set `name:` in the recipe")

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.functions]

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        rows: Sequence[dict[str, Any]],
    ) -> ScoreOutput:
        columns: dict[str, list[Any]] = {}
        for key in rows[0] if rows else []:
            if key not in ("prompt", "completions", "completion_ids"):
                columns[key] = [row.get(key) for row in rows]
        total = [0.0] * len(completions)
        per_function: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for name, weight, function in self.functions:
            try:
                values = function(
                    prompts=list(prompts), completions=list(completions), completion_ids=[list(c) for c in completion_ids],
                    **columns,
                )
            except Exception as exc:
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
            values = self._check(name, values, len(completions), rows)
            per_function[name] = values
            present = [v for v in values if v is not None]
            for i, value in enumerate(values):
                if value is not None:
                    total[i] += weight * value
            if present:
                mean = sum(present) / len(present)
                metrics[f"reward/{name}/mean"] = mean
                metrics[f"reward/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
            metrics[f"reward/{name}/none_share"] = 1 - len(present) / max(1, len(values))
        return ScoreOutput(total=total, per_function=per_function, metrics=metrics)

    @staticmethod
    def _check(name: str, values: Any, expected: int, rows: Sequence[dict[str, Any]]) -> list[float | None]:
        if not isinstance(values, list | tuple):
            raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a list of floats")
        if len(values) != expected:
            raise RewardError(f"reward {name!r} returned {len(values)} values for {expected} completions")
        checked: list[float | None] = []
        for i, value in enumerate(values):
            if value is None:
                checked.append(None)
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name!r} returned {value!r} (not a number) for row {rows[i]!r}") from None
            if not math.isfinite(number):
                raise RewardError(f"reward {name!r} returned {number} for row {rows[i]!r}; rewards must be finite")
            checked.append(number)
        return checked
