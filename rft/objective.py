"""The update's objective on one micro-batch, assembled from `rft.algorithms`, and its metrics.

Two stages, so that every count the loss divides by is known before the first backward pass:

1. Before the update (`loss_masks`): the tokens that count in the loss. The rollout correction's
   masks and the top-entropy mask depend on the log-probs and entropies of the policy that sampled,
   computed once for the whole step; the entropy quantile is taken over every token of the step (all
   micro-batches, all processes), so no split into micro-batches changes which tokens count.
2. Per micro-batch (`micro_batch_loss`): surrogate * rollout weights + beta * KL, aggregated with the
   global normaliser, minus the entropy bonus (a token mean over the global count of counted tokens,
   whatever `loss_agg`, as TRL), and the micro-batch's part of the step's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rft import algorithms, distributed
from rft.algorithms.policy_losses import SurrogateSettings
from rft.config import AlgorithmConfig
from rft.metrics import (
    ENTROPY,
    ENTROPY_KEPT_SHARE,
    KL_OLD,
    KL_REF,
    Accumulator,
    add_mismatch_stats,
    add_policy_stats,
    add_token_mean,
)

if TYPE_CHECKING:
    from accelerate import Accelerator


def needs_sampling_policy_pass(algorithm: AlgorithmConfig) -> bool:
    """True when the loss's mask depends on the sampling policy: its log-probs and entropies must be
    computed for the whole step before the update, even when the update could reuse its own forward."""
    settings = algorithm.rollout_settings
    masking = settings is not None and algorithms.is_masking(settings[0])  # type: ignore[arg-type]
    return masking or algorithm.top_entropy_quantile < 1.0


def _rollout(
    algorithm: AlgorithmConfig, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor] | None]:
    """(weights or None, the mask it leaves, mismatch stats or None) of the rollout correction."""
    if rollout_logp is None:
        return None, mask.bool(), None
    settings = algorithm.rollout_settings
    if settings is None:
        return None, mask.bool(), algorithms.rollout_mismatch(old_logp, rollout_logp, mask)
    mode, low, high = settings
    return algorithms.rollout_correction(old_logp, rollout_logp, mask, mode=mode, low=low, high=high)  # type: ignore[arg-type]


def loss_masks(
    algorithm: AlgorithmConfig, accelerator: Accelerator, masks: list[torch.Tensor],
    rollout_logps: list[torch.Tensor | None], old_logps: list[torch.Tensor | None],
    old_entropies: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Each micro-batch's tokens that count in the loss (bool): its mask, less the tokens the rollout
    correction drops, less (top_entropy_quantile < 1) those below the step's entropy quantile."""
    if not needs_sampling_policy_pass(algorithm):
        return [mask.bool() for mask in masks]
    kept = []
    for mask, rollout_logp, old_logp in zip(masks, rollout_logps, old_logps, strict=True):
        assert old_logp is not None
        kept.append(_rollout(algorithm, old_logp, rollout_logp, mask)[1])
    if algorithm.top_entropy_quantile >= 1.0:
        return kept
    # A process may hold padding passes only: the empty start keeps its share a (possibly empty) tensor.
    local = torch.cat([torch.zeros(0, dtype=torch.float64)] + [
        e[m].detach().to("cpu", torch.float64) for e, m in zip(old_entropies, kept, strict=True) if e is not None
    ])
    everywhere = torch.cat(distributed.gather_from_processes(accelerator, local))
    threshold = algorithms.top_entropy_threshold(everywhere, algorithm.top_entropy_quantile)
    return [
        algorithms.top_entropy_mask(e, m, threshold.to(m.device)) if e is not None else m
        for e, m in zip(old_entropies, kept, strict=True)
    ]


@dataclass
class Normalizers:
    """Global counts of one mini-batch (every micro-batch, every process)."""

    policy: torch.Tensor  # what `loss_agg` divides by
    tokens: torch.Tensor  # counted tokens: the entropy bonus's token mean


def normalizers(algorithm: AlgorithmConfig, accelerator: Accelerator, masks: list[torch.Tensor]) -> Normalizers:
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for mask in masks:
        counts = counts + torch.stack([
            algorithms.loss_normalizer(mask, loss_agg=algorithm.loss_agg),
            algorithms.loss_normalizer(mask, loss_agg="token-mean"),
        ]).to(counts.device)
    total = accelerator.reduce(counts, reduction="sum")
    return Normalizers(policy=total[0], tokens=total[1])


@dataclass
class MicroInputs:
    """One micro-batch's tensors for the loss, each (B, T)."""

    mask: torch.Tensor  # the completion tokens that count (after overlong filtering)
    loss_mask: torch.Tensor  # those that count in the loss (`loss_masks`)
    advantages: torch.Tensor  # (B,)
    logp: torch.Tensor
    entropy: torch.Tensor
    old_logp: torch.Tensor
    rollout_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None


def micro_batch_loss(
    algorithm: AlgorithmConfig, inputs: MicroInputs, norm: Normalizers, max_completion_length: int,
    sums: Accumulator,
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch's loss; its metrics go into `sums`."""
    is_weights, rollout_kept, mismatch = _rollout(algorithm, inputs.old_logp, inputs.rollout_logp, inputs.mask)
    settings = SurrogateSettings(
        cispo_eps_low=algorithm.cispo_eps_low, cispo_eps_high=algorithm.cispo_eps_high,
        sapo_tau_pos=algorithm.sapo_tau_pos, sapo_tau_neg=algorithm.sapo_tau_neg,
    )
    per_token, stats = algorithms.policy_loss(
        inputs.logp, inputs.old_logp, inputs.advantages, inputs.loss_mask,
        eps_low=algorithm.eps_low, eps_high=algorithm.eps_high, delta=algorithm.delta,
        importance_sampling_level=algorithm.importance_sampling_level, is_weights=is_weights,
        loss=algorithm.loss, settings=settings,
    )
    kl = None
    if inputs.ref_logp is not None:
        kl = algorithms.kl_penalty(inputs.logp, inputs.ref_logp, algorithm.kl_estimator)
        per_token = per_token + algorithm.beta * kl * inputs.loss_mask
    loss = algorithms.aggregate_loss(
        per_token, inputs.loss_mask, loss_agg=algorithm.loss_agg, normalizer=norm.policy,
        max_completion_length=max_completion_length,
    )
    if algorithm.entropy_coef:
        bonus = algorithms.aggregate_loss(
            inputs.entropy, inputs.loss_mask, loss_agg="token-mean", normalizer=norm.tokens,
            max_completion_length=max_completion_length,
        )
        loss = loss - algorithm.entropy_coef * bonus

    # Metrics: padding micro-batches too (nothing counted), so that every process adds the same ones.
    add_policy_stats(sums, stats)
    if mismatch is not None:
        add_mismatch_stats(sums, mismatch)
    if kl is not None:
        add_token_mean(sums, KL_REF, kl, inputs.mask)
    add_token_mean(sums, ENTROPY, inputs.entropy, inputs.mask)
    add_token_mean(sums, KL_OLD, algorithms.kl_penalty(inputs.logp.detach(), inputs.old_logp, "k3"), inputs.mask)
    if algorithm.top_entropy_quantile < 1.0:
        # Of the tokens the rollout correction keeps: the share the entropy mask keeps too.
        sums.add(ENTROPY_KEPT_SHARE, inputs.loss_mask.sum(), rollout_kept.sum())
    return loss
