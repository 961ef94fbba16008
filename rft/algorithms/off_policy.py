"""Correction for the rollout/trainer mismatch: the sampling engine's log-probs differ from the
trainer's for the same tokens (other kernels, precision, batching), so the samples are slightly
off-policy even at the first update. Truncated importance sampling (TIS; Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training") reweights each token by
min(pi_trainer / pi_rollout, C).
"""

from __future__ import annotations

import torch

from ._masked import masked_max, masked_sum


def _log_ratio(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # where, not multiply: padding may hold inf, and the weights are constants of the loss.
    return torch.where(counted, trainer_logp.detach() - rollout_logp.detach(), 0.0)


def rollout_mismatch(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mismatch statistics over the counted tokens, as sums that add across batches (detached 0-dim tensors).

    `tokens`: the counted tokens; `mismatch_abs_sum`: sum of |log pi_trainer - log pi_rollout|
    (divided by `tokens`, the mean absolute log-prob gap); `mismatch_ratio_max`: max of
    pi_trainer / pi_rollout (0 when nothing is counted).
    """
    counted = mask.bool()
    log_ratio = _log_ratio(trainer_logp, rollout_logp, counted)
    return {
        "tokens": counted.sum().to(log_ratio.dtype),
        "mismatch_abs_sum": masked_sum(log_ratio.abs(), counted),
        "mismatch_ratio_max": masked_max(log_ratio.exp(), counted),
    }


def truncated_importance_weights(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIS weights min(exp(trainer_logp - rollout_logp), cap), (B, T), detached, 0 off `mask`.

    Stats: those of `rollout_mismatch` (the max ratio is taken before capping) and
    `tis_capped_tokens`, how many counted tokens have a ratio above `cap`.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    counted = mask.bool()
    ratio = _log_ratio(trainer_logp, rollout_logp, counted).exp()
    weights = torch.where(counted, ratio.clamp(max=cap), 0.0)
    stats = rollout_mismatch(trainer_logp, rollout_logp, mask)
    stats["tis_capped_tokens"] = masked_sum((ratio > cap).to(ratio.dtype), counted)
    return weights, stats
