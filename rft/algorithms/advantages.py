"""Group-relative advantages: one scalar per completion, broadcast to its tokens by the loss.

`rewards` has shape (num_groups, group_size): row g holds the rewards of the G completions sampled
for prompt g. Every standard deviation here is the Bessel-corrected one (divides by n - 1), as in
TRL and verl.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Estimator = Literal["grpo", "dr_grpo", "rloo"]
Scale = Literal["group", "batch", "none"]


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(num_groups,) bool: True where all rewards of the group are equal.

    These groups carry no learning signal (their advantages are 0); DAPO's dynamic sampling
    (Yu et al. 2025, the constraint of eq. 8) drops them and samples more. A group of one
    completion counts as zero-variance.
    """
    _check_rewards(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


def compute_advantages(
    rewards: torch.Tensor,
    *,
    estimator: Estimator,
    scale: Scale,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages of shape (num_groups, group_size), the shape of `rewards`.

    Centring:
      - `grpo`: A_i = R_i - mean_group(R) (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision).
      - `dr_grpo`: the same centring and never a division (Liu et al. 2025, "Understanding R1-Zero-Like
        Training: A Critical Perspective"), so `scale` must be "none".
      - `rloo`: A_i = R_i - mean_{j != i} R_j, the leave-one-out baseline (Kool et al. 2019;
        Ahmadian et al. 2024, "Back to Basics").
    Division (`scale`):
      - `group`: by the group's Bessel-corrected std + eps (GRPO).
      - `batch`: by the Bessel-corrected std of all rewards of the batch + eps.
      - `none`: no division.

    A group whose rewards are all equal gets exactly 0 for every member, whatever the estimator and
    scale; with group_size 1 every advantage is 0 (there is no baseline to compare with).
    """
    if estimator not in get_args(Estimator):
        raise ValueError(f"estimator {estimator!r}: expected one of {get_args(Estimator)}")
    if scale not in get_args(Scale):
        raise ValueError(f"scale {scale!r}: expected one of {get_args(Scale)}")
    if estimator == "dr_grpo" and scale != "none":
        raise ValueError("estimator dr_grpo divides by no std: use scale 'none' (or estimator 'grpo')")
    _check_rewards(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    group_size = rewards.shape[1]
    if group_size < 2:
        return torch.zeros_like(rewards)

    if estimator == "rloo":
        others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
        advantages = rewards - others_mean
    else:
        advantages = rewards - rewards.mean(dim=1, keepdim=True)

    if scale == "group":
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)

    # Set, not computed: the mean of equal floats need not round back to them (0.1 * 3 / 3), and
    # with eps = 0 the division would give 0/0; such groups must contribute no gradient at all.
    return advantages.masked_fill(zero_variance_groups(rewards).unsqueeze(1), 0.0)


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (num_groups, group_size), got {tuple(rewards.shape)}")
