"""DAPO's two treatments of completions cut at the length limit (Yu et al. 2025, Sec. 3.4)."""

from __future__ import annotations

import torch


def soft_overlong_punishment(lengths: torch.Tensor, *, max_length: int, cache_length: int) -> torch.Tensor:
    """Length penalty added to the reward (DAPO eq. 13), float, same shape as `lengths`.

        0                                  if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache    if L_max - L_cache < |y| <= L_max
        -1                                 if |y| > L_max

    with L_max = `max_length` and L_cache = `cache_length` (paper: 20480 and 4096).
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}"
        )
    if not lengths.is_floating_point():
        lengths = lengths.to(torch.get_default_dtype())
    threshold = max_length - cache_length
    ramp = (threshold - lengths) / cache_length
    penalty = torch.where(lengths <= max_length, ramp, -1.0)
    return torch.where(lengths <= threshold, 0.0, penalty)


def truncation_mask(truncated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: a copy of `mask` (B, T) with the rows where `truncated` (B,) is True set to 0.

    A truncated completion may hold sound reasoning that merely ran out of room, so punishing it
    adds reward noise (DAPO Sec. 3.4); overlong filtering leaves it out of the loss instead.
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(
            f"truncated must have shape (B,) = {tuple(mask.shape[:1])}, got {tuple(truncated.shape)}"
        )
    return mask.masked_fill(truncated.bool().unsqueeze(-1), 0)
