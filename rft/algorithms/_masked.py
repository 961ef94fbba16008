"""Reductions over the counted (masked-in) tokens, shared by the metrics of this package."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (bool) is True, detached; 0 when nothing is counted."""
    # where, not multiply: padding may hold inf, and inf * 0 would turn the sum into NaN.
    total = torch.where(mask, values.detach(), 0.0).sum()
    return total / mask.sum().clamp(min=1)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of `values` where `mask` (bool) is True, detached; 0 when nothing is counted."""
    filled = values.detach().masked_fill(~mask, float("-inf")).flatten()
    # The extra -inf keeps amax defined for an empty batch without a host sync to test for it.
    top = torch.cat([filled, filled.new_full((1,), float("-inf"))]).amax()
    return torch.where(torch.isneginf(top), torch.zeros_like(top), top)
