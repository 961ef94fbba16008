"""Entropy in the objective: keeping only the high-entropy "forking" tokens, and an entropy bonus.

Per-token tensors have shape (B, T) with `mask` 1 (or True) on the counted completion tokens.
"""

from __future__ import annotations

import torch


def top_entropy_threshold(entropies: torch.Tensor, quantile: float) -> torch.Tensor:
    """The entropy at or above which a token is among the top `quantile` share, a 0-dim float64 tensor.

    `entropies` holds the counted tokens' entropies of the whole batch (1-D, any order): the threshold
    is their (1 - quantile)-quantile with linear interpolation between order statistics, as
    `torch.quantile` and TRL's `top_entropy_quantile` compute it (sorted here, since `torch.quantile`
    refuses more than 2^24 values). 1.0 gives the minimum (every token stays), 0.0 the maximum (only
    the highest-entropy tokens stay). No values: +inf (nothing to keep).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {quantile}")
    values = entropies.detach().flatten().to(torch.float64).sort().values
    if values.numel() == 0:
        return torch.tensor(float("inf"), dtype=torch.float64, device=entropies.device)
    position = (1.0 - quantile) * (values.numel() - 1)
    below = int(position)
    above = min(below + 1, values.numel() - 1)
    # a + (b - a) * f is exactly a when a == b or f == 0: ties and the endpoints are never crossed
    # by rounding.
    return values[below] + (values[above] - values[below]) * (position - below)


def top_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float
) -> torch.Tensor:
    """Bool (B, T): the counted tokens whose entropy is >= `threshold` (see `top_entropy_threshold`).

    "Beyond the 80/20 Rule" (Wang et al. 2025, arXiv 2506.01939): the policy gradient counts only
    the tokens I[H_i,t >= tau_rho] whose entropy is in the batch's top rho share (paper: rho = 0.2),
    the minority of "forking" tokens where the reasoning branches.
    """
    threshold = torch.as_tensor(threshold, dtype=torch.float64, device=entropy.device)
    return mask.bool() & (entropy.detach().to(torch.float64) >= threshold)
