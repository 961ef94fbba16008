"""A step's metric parts as tensors, until one reduction a step (see `rft.metrics` for the kinds).

Values are kept as tensors where they are tensors (no `.item()` per metric per micro-batch) and
brought to the host by `Accumulator.reduce`: one device sync and one collective a step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from rft.metrics import (
    CLIP_HIGH,
    CLIP_LOW,
    CLIP_REGION,
    MISMATCH_ABS_MEAN,
    MISMATCH_RATIO_MAX,
    RATIO_MAX,
    RATIO_MEAN,
    ROLLOUT_KL,
    ROLLOUT_MASKED_SHARE,
    TIS_CAPPED_SHARE,
    Metric,
    Reduction,
    described,
    finish,
    pool,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

Number = float | torch.Tensor
EXTREMES = (Reduction.MAX, Reduction.MIN)
F64 = torch.float64


def _as_float64(value: Number) -> Number:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)


def _extreme_part(kind: Reduction, value: Number, count: Number | None) -> list[Number]:
    """[max] or [-min]; a part whose `count` is 0 holds -inf (nothing)."""
    extreme = _as_float64(value)
    extreme = extreme if kind is Reduction.MAX else -extreme
    if isinstance(count, torch.Tensor):
        # A tensor condition stays on the device: no sync to learn whether the part was empty.
        as_tensor = torch.as_tensor(extreme, dtype=torch.float64, device=count.device)
        return [torch.where(count > 0, as_tensor, -math.inf)]
    if count is not None and count <= 0:
        return [-math.inf]
    return [extreme]


class Accumulator:
    """A step's metrics as combinable parts: sums, counts and extremes, until `result` / `reduce`."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        # SUM: [total]; MEAN: [numerator, count]; STD: [n, sum, sum of squares]; MAX: [max]; MIN: [-min].
        self._slots: dict[str, list[Number]] = {}

    def add(self, metric: Metric, value: Number | Sequence[float], count: Number | None = None) -> None:
        """Add one part of `metric`.

        - SUM: `value` is the part's total.
        - MEAN: `value` is the sum of the part's `count` values (`count` is required).
        - MAX / MIN: `value` is the part's extreme; a part whose `count` is 0 holds nothing.
        - STD: `value` holds the part's values (1-D).
        """
        kind = metric.reduction
        if kind is Reduction.MEAN and count is None:
            raise ValueError(f"{metric.name}: a mean needs the count of the values its part sums")
        if kind in (Reduction.SUM, Reduction.STD) and count is not None:
            raise ValueError(f"{metric.name}: a {kind.value} takes no count")
        part: list[Number]
        if kind is Reduction.STD:
            values = torch.as_tensor(value, dtype=torch.float64).flatten()
            part = [float(values.numel()), values.sum(), values.square().sum()]
        elif kind in EXTREMES:
            part = _extreme_part(kind, value, count)  # type: ignore[arg-type]
        elif kind is Reduction.MEAN:
            part = [_as_float64(value), _as_float64(count)]  # type: ignore[arg-type]
        else:
            part = [_as_float64(value)]  # type: ignore[arg-type]
        self._merge_part(metric, part)

    def describe(self, prefix: str, values: torch.Tensor | Sequence[float], *, extremes: bool = True,
                 std: bool = True) -> None:
        """Mean, std, min and max of `values` (1-D) under `prefix`, as parts (see `rft.metrics.described`)."""
        values = torch.as_tensor(values, dtype=torch.float64).detach().flatten()
        for metric in described(prefix, extremes=extremes, std=std):
            kind = metric.reduction
            if kind is Reduction.MEAN:
                self.add(metric, values.sum(), float(values.numel()))
            elif kind is Reduction.STD:
                self.add(metric, values)
            else:
                extreme = (values.max() if kind is Reduction.MAX else values.min()) if values.numel() else 0.0
                self.add(metric, extreme, float(values.numel()))

    def merge(self, other: Accumulator) -> Accumulator:
        """Add `other`'s parts (another round, another process) into this one; returns self."""
        for name, slots in other._slots.items():
            self._merge_part(other._metrics[name], slots)
        return self

    def _merge_part(self, metric: Metric, part: list[Number]) -> None:
        known = self._metrics.setdefault(metric.name, metric)
        if known != metric:
            raise ValueError(
                f"metric {metric.name!r} declared as {known.reduction.value} and {metric.reduction.value}"
            )
        slots = self._slots.get(metric.name)
        if slots is None:
            self._slots[metric.name] = list(part)
        elif metric.reduction in EXTREMES and any(isinstance(x, torch.Tensor) for x in (slots[0], part[0])):
            device = next(x.device for x in (slots[0], part[0]) if isinstance(x, torch.Tensor))
            a, b = (torch.as_tensor(x, dtype=torch.float64, device=device) for x in (slots[0], part[0]))
            slots[0] = torch.maximum(a, b)
        else:
            self._slots[metric.name] = pool(metric.reduction, slots, part)

    def result(self) -> dict[str, float]:
        """The finished metrics of these parts alone (no collective)."""
        names = sorted(self._slots)
        flat = [x for name in names for x in self._slots[name]]
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if tensors:
            # One transfer for all of them (this is the device sync), not one `.item()` each.
            device = tensors[0].device
            flat = torch.stack([torch.as_tensor(x, dtype=F64, device=device) for x in flat]).tolist()
        return self._finish(names, [float(x) for x in flat])

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """The finished metrics over these parts in every process: one collective, one device sync.

        Every process must hold the same metrics (a part with nothing counted adds count 0), since
        their values travel as one vector; a fingerprint of the names checks it.
        """
        if accelerator.num_processes == 1:
            return self.result()
        names = sorted(self._slots)
        signature = "\n".join(f"{name}:{self._metrics[name].reduction.value}" for name in names)
        flat = [float(zlib.crc32(signature.encode()))] + [x for name in names for x in self._slots[name]]
        vector = torch.stack([torch.as_tensor(x, dtype=F64, device=accelerator.device) for x in flat])
        gathered = accelerator.gather(vector.unsqueeze(0)).view(accelerator.num_processes, -1)
        extreme = torch.tensor(
            [self._metrics[name].reduction in EXTREMES for name in names for _ in self._slots[name]],
            device=gathered.device,
        )
        combined = torch.where(extreme, gathered[:, 1:].amax(dim=0), gathered[:, 1:].sum(dim=0))
        differ = (gathered[:, :1] != gathered[:1, :1]).any().to(torch.float64)
        # Note: this is the step's one device sync.
        differ_flag, *values = torch.cat([differ.unsqueeze(0), combined]).tolist()
        if differ_flag:
            raise RuntimeError(
                "the processes recorded different metrics in this step: every process must add the same"
            )
        return self._finish(names, values)

    def _finish(self, names: list[str], flat: list[float]) -> dict[str, float]:
        finished: dict[str, float] = {}
        position = 0
        for name in names:
            width = len(self._slots[name])
            part, position = flat[position : position + width], position + width
            value = finish(self._metrics[name].reduction, part)
            if value is not None:
                finished[name] = value
        return finished


def merged(parts: Iterable[Accumulator]) -> Accumulator:
    """One accumulator holding all `parts` (processes, rounds)."""
    total = Accumulator()
    for part in parts:
        total.merge(part)
    return total


# ---------------------------------------------------------------- the update's statistics
def add_token_mean(
    accumulator: Accumulator, metric: Metric, values: torch.Tensor, mask: torch.Tensor
) -> None:
    """The part of a per-token mean held by one micro-batch: the sum over its counted tokens and their
    number."""
    counted = mask.bool()
    accumulator.add(metric, torch.where(counted, values.detach(), 0.0).sum(), counted.sum())


def add_policy_stats(accumulator: Accumulator, stats: dict[str, torch.Tensor]) -> None:
    """`rft.algorithms.policy_loss`'s statistics (sums over counted tokens) as parts of the step's metrics."""
    tokens = stats["tokens"]
    accumulator.add(CLIP_LOW, stats["clip_low_tokens"], tokens)
    accumulator.add(CLIP_HIGH, stats["clip_high_tokens"], tokens)
    accumulator.add(CLIP_REGION, stats["clip_region_tokens"], tokens)
    accumulator.add(RATIO_MEAN, stats["ratio_sum"], tokens)
    accumulator.add(RATIO_MAX, stats["ratio_max"], tokens)


def add_mismatch_stats(accumulator: Accumulator, stats: dict[str, torch.Tensor]) -> None:
    """`rollout_mismatch` / `rollout_correction` statistics as metric parts."""
    tokens = stats["tokens"]
    accumulator.add(MISMATCH_ABS_MEAN, stats["mismatch_abs_sum"], tokens)
    accumulator.add(MISMATCH_RATIO_MAX, stats["mismatch_ratio_max"], tokens)
    accumulator.add(ROLLOUT_KL, stats["rollout_kl_sum"], tokens)
    if "tis_capped_tokens" in stats:
        accumulator.add(TIS_CAPPED_SHARE, stats["tis_capped_tokens"], tokens)
    if "masked_tokens" in stats:
        accumulator.add(ROLLOUT_MASKED_SHARE, stats["masked_tokens"], tokens)
