"""Pure tensor maths of GRPO, DAPO, GSPO, Dr. GRPO, CISPO and SAPO: advantages, policy losses and their
aggregation, KL estimators, overlong shaping, off-policy corrections, entropy masking.

Imports torch and the standard library only, so every formula can be tested on its own.
"""

from .advantages import Estimator, Scale, compute_advantages, zero_variance_groups
from .entropy import top_entropy_mask, top_entropy_threshold
from .kl import KLEstimator, kl_penalty
from .losses import ImportanceSamplingLevel, LossAggregation, aggregate_loss, loss_normalizer, policy_loss
from .off_policy import (
    RolloutCorrection,
    is_masking,
    rollout_correction,
    rollout_mismatch,
    truncated_importance_weights,
)
from .overlong import soft_overlong_punishment, truncation_mask
from .policy_losses import PolicyLossName, SurrogateSettings

__all__ = [
    "Estimator",
    "ImportanceSamplingLevel",
    "KLEstimator",
    "LossAggregation",
    "PolicyLossName",
    "RolloutCorrection",
    "Scale",
    "SurrogateSettings",
    "aggregate_loss",
    "compute_advantages",
    "is_masking",
    "kl_penalty",
    "loss_normalizer",
    "policy_loss",
    "rollout_correction",
    "rollout_mismatch",
    "soft_overlong_punishment",
    "top_entropy_mask",
    "top_entropy_threshold",
    "truncated_importance_weights",
    "truncation_mask",
    "zero_variance_groups",
]
