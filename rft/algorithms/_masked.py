"""Reductions over the counted (masked-in) tokens, shared by the statistics of this package.

Statistics are returned as sums and extremes, not means: a sum adds across micro-batches and
processes, a mean of means weights each part by its size instead of its tokens.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` (bool) is True, detached; 0 when nothing is counted."""
    # where, not multiply: padding may hold inf, and inf * 0 would turn the sum into NaN.
    return torch.where(mask, values.detach(), 0.0).sum()


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of `values` where `mask` (bool) is True, detached; 0 when nothing is counted."""
    filled = values.detach().masked_fill(~mask, float("-inf")).flatten()
    # The extra -inf keeps amax defined for an empty batch without a host sync to test for it.
    top = torch.cat([filled, filled.new_full((1,), float("-inf"))]).amax()
    return torch.where(torch.isneginf(top), torch.zeros_like(top), top)
