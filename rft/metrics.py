"""A step's metrics: each declared once, by name, with the way its parts combine; reduced once a step.

A step is computed in parts (micro-batches, dynamic-sampling rounds, processes), and every metric
of its row must equal its definition over the whole step, whatever the split. So a part never holds
a finished mean: it holds a numerator and its count (tokens, sequences, updates), an extreme, or a
count, sum and sum of squares; parts add, and the division happens once, in `Accumulator.result`.

- `SUM`: counts (errors, timeouts, tokens) add.
- `MEAN`: sum of the numerators / sum of the counts: a token share is weighted by tokens, a mean
  over sequences by sequences, a mean over optimizer updates by updates.
- `MAX`, `MIN`: the extreme over every part.
- `STD`: the Bessel-corrected standard deviation (divides by n - 1), the one convention of the
  whole row, as the advantages' (`rft.algorithms.advantages`), TRL and verl use; 0 for one value.

A mean or extreme over nothing (no counted token, no present reward) is left out of the row rather
than written as 0. Values are kept as tensors where they are tensors (no `.item()` per metric per
micro-batch) and brought to the host by `reduce`: one device sync and one collective a step.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

Number = float | torch.Tensor


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


# The update (`Trainer.update`): token means and shares over the counted tokens of every micro-batch.
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
ROLLOUT_MASKED_SHARE = Metric("rollout/masked_share", Reduction.MEAN)  # dropped by a *_mask / icepop correction
ROLLOUT_KL = Metric("rollout/kl", Reduction.MEAN)  # k3 estimate of KL(pi_rollout || pi_trainer)
ENTROPY_KEPT_SHARE = Metric("entropy/kept_share", Reduction.MEAN)  # kept by algorithm.top_entropy_quantile
# The training batch (`Trainer._assemble`).
TRUNCATED_SHARE = Metric("completion/truncated_share", Reduction.MEAN)
COMPLETION_TOKENS = Metric("completion/tokens", Reduction.SUM)


def described(prefix: str, *, extremes: bool = True, std: bool = True) -> tuple[Metric, ...]:
    """The metrics `Accumulator.describe` writes under `prefix`: mean, std, min, max."""
    metrics = [Metric(f"{prefix}/mean", Reduction.MEAN)]
    if std:
        metrics.append(Metric(f"{prefix}/std", Reduction.STD))
    if extremes:
        metrics += [Metric(f"{prefix}/min", Reduction.MIN), Metric(f"{prefix}/max", Reduction.MAX)]
    return tuple(metrics)


def _as_float64(value: Number) -> Number:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)


def _maximum(a: Number, b: Number) -> Number:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        device = a.device if isinstance(a, torch.Tensor) else b.device  # type: ignore[union-attr]
        a, b = (torch.as_tensor(x, dtype=torch.float64, device=device) for x in (a, b))
        return torch.maximum(a, b)
    return max(a, b)


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
        elif kind in (Reduction.MAX, Reduction.MIN):
            extreme = _as_float64(value)  # type: ignore[arg-type]
            extreme = extreme if kind is Reduction.MAX else -extreme
            if isinstance(count, torch.Tensor):
                # A tensor condition stays on the device: no sync to learn whether the part was empty.
                extreme = torch.where(count > 0, torch.as_tensor(extreme, dtype=torch.float64, device=count.device),
                                      -math.inf)
            elif count is not None and count <= 0:
                extreme = -math.inf
            part = [extreme]
        elif kind is Reduction.MEAN:
            part = [_as_float64(value), _as_float64(count)]  # type: ignore[arg-type]
        else:
            part = [_as_float64(value)]  # type: ignore[arg-type]
        self._merge_part(metric, part)

    def describe(self, prefix: str, values: torch.Tensor | Sequence[float], *, extremes: bool = True,
                 std: bool = True) -> None:
        """Mean, std, min and max of `values` (1-D) under `prefix`, as parts (see `described`)."""
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
            raise ValueError(f"metric {metric.name!r} declared as {known.reduction.value} and {metric.reduction.value}")
        slots = self._slots.get(metric.name)
        if slots is None:
            self._slots[metric.name] = list(part)
        elif metric.reduction in (Reduction.MAX, Reduction.MIN):
            slots[0] = _maximum(slots[0], part[0])
        else:
            self._slots[metric.name] = [a + b for a, b in zip(slots, part, strict=True)]

    def result(self) -> dict[str, float]:
        """The finished metrics of these parts alone (no collective)."""
        names = sorted(self._slots)
        flat = [x for name in names for x in self._slots[name]]
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if tensors:
            # One transfer for all of them (this is the device sync), not one `.item()` each.
            device = tensors[0].device
            flat = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in flat]).tolist()
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
        vector = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=accelerator.device) for x in flat])
        gathered = accelerator.gather(vector.unsqueeze(0)).view(accelerator.num_processes, -1)
        extreme = torch.tensor(
            [self._metrics[name].reduction in (Reduction.MAX, Reduction.MIN)
             for name in names for _ in self._slots[name]], device=gathered.device,
        )
        combined = torch.where(extreme, gathered[:, 1:].amax(dim=0), gathered[:, 1:].sum(dim=0))
        differ = (gathered[:, :1] != gathered[:1, :1]).any().to(torch.float64)
        # Note: this is the step's one device sync.
        differ_flag, *values = torch.cat([differ.unsqueeze(0), combined]).tolist()
        if differ_flag:
            raise RuntimeError("the processes recorded different metrics in this step: every process must add the same")
        return self._finish(names, values)

    def _finish(self, names: list[str], flat: list[float]) -> dict[str, float]:
        finished: dict[str, float] = {}
        position = 0
        for name in names:
            width = len(self._slots[name])
            values, position = flat[position : position + width], position + width
            value = _finish_one(self._metrics[name].reduction, values)
            if value is not None:
                finished[name] = value
        return finished


def _finish_one(kind: Reduction, values: list[float]) -> float | None:
    if kind is Reduction.SUM:
        return values[0]
    if kind is Reduction.MEAN:
        numerator, count = values
        return numerator / count if count > 0 else None
    if kind is Reduction.STD:
        n, total, squares = values
        if n < 1:
            return None
        # In float64; sum of squares minus n mean^2, divided by n - 1 (Bessel).
        return math.sqrt(max(0.0, squares - total * total / n) / (n - 1)) if n > 1 else 0.0
    if math.isinf(values[0]) and values[0] < 0:
        return None  # nothing was counted in any part
    return values[0] if kind is Reduction.MAX else -values[0]


def merged(parts: Iterable[Accumulator]) -> Accumulator:
    """One accumulator holding all `parts` (processes, rounds)."""
    total = Accumulator()
    for part in parts:
        total.merge(part)
    return total


# ---------------------------------------------------------------- the update's statistics


def add_token_mean(accumulator: Accumulator, metric: Metric, values: torch.Tensor, mask: torch.Tensor) -> None:
    """The part of a per-token mean held by one micro-batch: the sum over its counted tokens and their number."""
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
    """`rollout_mismatch` / `truncated_importance_weights` / `rollout_correction` statistics as metric parts."""
    tokens = stats["tokens"]
    accumulator.add(MISMATCH_ABS_MEAN, stats["mismatch_abs_sum"], tokens)
    accumulator.add(MISMATCH_RATIO_MAX, stats["mismatch_ratio_max"], tokens)
    accumulator.add(ROLLOUT_KL, stats["rollout_kl_sum"], tokens)
    if "tis_capped_tokens" in stats:
        accumulator.add(TIS_CAPPED_SHARE, stats["tis_capped_tokens"], tokens)
    if "masked_tokens" in stats:
        accumulator.add(ROLLOUT_MASKED_SHARE, stats["masked_tokens"], tokens)
