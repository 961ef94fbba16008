"""Pure tensor maths of GRPO, DAPO, GSPO and Dr. GRPO: advantages, clipped policy losses and their
aggregation, KL estimators, overlong shaping, off-policy corrections.

Imports torch and the standard library only, so every formula can be tested on its own.
"""

from .advantages import Estimator, Scale, compute_advantages, zero_variance_groups
from .kl import KLEstimator, kl_penalty
from .losses import ImportanceSamplingLevel, LossAggregation, aggregate_loss, loss_normalizer, policy_loss
from .off_policy import rollout_mismatch, truncated_importance_weights
from .overlong import soft_overlong_punishment, truncation_mask

__all__ = [
    "Estimator",
    "ImportanceSamplingLevel",
    "KLEstimator",
    "LossAggregation",
    "Scale",
    "aggregate_loss",
    "compute_advantages",
    "kl_penalty",
    "loss_normalizer",
    "policy_loss",
    "rollout_mismatch",
    "soft_overlong_punishment",
    "truncated_importance_weights",
    "truncation_mask",
    "zero_variance_groups",
]
