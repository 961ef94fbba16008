"""The update's objective on one micro-batch, assembled once: surrogate x rollout weights + beta x KL,
aggregated over the global normaliser, minus the entropy bonus.

  L = agg_N( l_surrogate(r, A) * w_rollout + beta * KL(pi_theta || pi_ref) ) - c_H * tokenmean_M( H )

- `l_surrogate`: `policy_loss` (PPO-clip / GRPO / DAPO / GSPO, CISPO, SAPO);
- `w_rollout`: the rollout correction's importance weights (`rollout_correction`), or none;
- `agg_N`: `aggregate_loss` under `loss_agg` with N the GLOBAL count of the mini-batch
  (`Normalizers.policy`: every micro-batch, every process), so that the sum over micro-batches is the
  mini-batch's loss whatever the split;
- the entropy bonus is a token mean over the global count of counted tokens (`Normalizers.tokens`),
  whatever `loss_agg`, as TRL.

Pure: tensors in, `Objective(loss, metrics)` out; the global counts and the loss mask (which may
depend on the whole step) are computed by the caller (`rft.objective`). Imports torch and
`rft.algorithms` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kl import KLEstimator, kl_penalty
from .losses import ImportanceSamplingLevel, LossAggregation, aggregate_loss, policy_loss
from .off_policy import RolloutCorrection, rollout_correction, rollout_mismatch
from .policy_losses import PolicyLossName, SurrogateSettings


@dataclass(frozen=True, kw_only=True)
class ObjectiveSettings:
    """Every constant of the objective (the recipe's `algorithm` section, less what is not maths)."""

    max_completion_length: int  # Dr. GRPO's constant divisor
    loss: PolicyLossName = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: ImportanceSamplingLevel = "token"
    surrogate: SurrogateSettings = field(default_factory=SurrogateSettings)  # CISPO's bounds, SAPO's taus
    rollout_correction: RolloutCorrection | None = None  # None: the mismatch is measured, not corrected
    rollout_low: float | None = None
    rollout_high: float | None = None
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    loss_agg: LossAggregation = "seq-mean-token-mean"
    entropy_coef: float = 0.0
    # The loss mask keeps only the step's high-entropy tokens (a metric says how many).
    top_entropy: bool = False


@dataclass
class MicroInputs:
    """One micro-batch's tensors for the loss: B sequences, T the padded completion length."""

    mask: torch.Tensor  # [B, T] the completion tokens that count (after overlong filtering)
    loss_mask: torch.Tensor  # [B, T] bool, those that count in the loss (`rft.objective.loss_masks`)
    advantages: torch.Tensor  # [B]
    logp: torch.Tensor  # [B, T] the policy being updated (with its graph)
    entropy: torch.Tensor  # [B, T]
    old_logp: torch.Tensor  # [B, T] the policy before this step's updates
    rollout_logp: torch.Tensor | None  # [B, T] the sampling engine's, when it reports them
    ref_logp: torch.Tensor | None  # [B, T] the reference policy's, when beta > 0


@dataclass
class Normalizers:
    """Global counts of one mini-batch (every micro-batch, every process), 0-dim."""

    policy: torch.Tensor  # what `loss_agg` divides by
    tokens: torch.Tensor  # counted tokens: the entropy bonus's token mean


@dataclass
class ObjectiveMetrics:
    """The micro-batch's statistics as sums over counted tokens (detached 0-dim tensors): they add
    across micro-batches and processes, and a mean is a sum divided by its count."""

    policy: dict[str, torch.Tensor]  # `policy_loss`'s stats over the loss's tokens
    mismatch: dict[str, torch.Tensor] | None  # the rollout correction's, over `mask`; None: no rollout_logp
    tokens: torch.Tensor  # the counted tokens of `mask`: the count of the sums below
    entropy_sum: torch.Tensor
    kl_old_sum: torch.Tensor  # k3 estimate of KL(pi_theta || pi_old)
    kl_ref_sum: torch.Tensor | None  # the loss's estimator of KL(pi_theta || pi_ref); None with no reference
    # (tokens in the loss, tokens the rollout correction keeps): the share the entropy mask keeps.
    entropy_kept: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Objective:
    loss: torch.Tensor  # 0-dim: this micro-batch's share of the mini-batch's loss
    metrics: ObjectiveMetrics


def rollout_weights(
    settings: ObjectiveSettings, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor] | None]:
    """(importance weights or None, the mask they leave (bool), mismatch stats or None)."""
    if rollout_logp is None:
        return None, mask.bool(), None
    if settings.rollout_correction is None:
        return None, mask.bool(), rollout_mismatch(old_logp, rollout_logp, mask)
    return rollout_correction(
        old_logp, rollout_logp, mask, mode=settings.rollout_correction, low=settings.rollout_low,
        high=settings.rollout_high,
    )


def _token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values.detach(), 0.0).sum()


def objective(settings: ObjectiveSettings, inputs: MicroInputs, norm: Normalizers) -> Objective:
    """This micro-batch's share of the mini-batch's loss (see the module docstring) and its metrics."""
    weights, rollout_kept, mismatch = rollout_weights(
        settings, inputs.old_logp, inputs.rollout_logp, inputs.mask
    )
    per_token, policy_stats = policy_loss(
        inputs.logp, inputs.old_logp, inputs.advantages, inputs.loss_mask,
        eps_low=settings.eps_low, eps_high=settings.eps_high, delta=settings.delta,
        importance_sampling_level=settings.importance_sampling_level, is_weights=weights,
        loss=settings.loss, settings=settings.surrogate,
    )
    kl_ref = None
    if inputs.ref_logp is not None:
        kl_ref = kl_penalty(inputs.logp, inputs.ref_logp, settings.kl_estimator)
        per_token = per_token + settings.beta * kl_ref * inputs.loss_mask
    loss = aggregate_loss(
        per_token, inputs.loss_mask, loss_agg=settings.loss_agg, normalizer=norm.policy,
        max_completion_length=settings.max_completion_length,
    )
    if settings.entropy_coef:
        bonus = aggregate_loss(
            inputs.entropy, inputs.loss_mask, loss_agg="token-mean", normalizer=norm.tokens,
            max_completion_length=settings.max_completion_length,
        )
        loss = loss - settings.entropy_coef * bonus
    metrics = ObjectiveMetrics(
        policy=policy_stats, mismatch=mismatch, tokens=inputs.mask.bool().sum(),
        entropy_sum=_token_sum(inputs.entropy, inputs.mask),
        kl_old_sum=_token_sum(kl_penalty(inputs.logp.detach(), inputs.old_logp, "k3"), inputs.mask),
        kl_ref_sum=_token_sum(kl_ref, inputs.mask) if kl_ref is not None else None,
        entropy_kept=(inputs.loss_mask.sum(), rollout_kept.sum()) if settings.top_entropy else None,
    )
    return Objective(loss=loss, metrics=metrics)
