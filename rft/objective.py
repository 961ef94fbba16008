"""What the objective needs from the whole step, and the recipe's algorithm turned into its settings.

The objective itself is `rft.algorithms.objective.objective` (pure). Its inputs that no micro-batch
can compute alone are computed here, before the first backward pass:

1. Before the update (`loss_masks`): the tokens that count in the loss. The rollout correction's
   masks and the top-entropy mask depend on the log-probs and entropies of the policy that sampled,
   computed once for the whole step; the entropy quantile is taken over every token of the step (all
   micro-batches, all processes), so no split into micro-batches changes which tokens count.
2. Per mini-batch (`normalizers`): the global counts the loss divides by (one collective).
3. Per micro-batch (`micro_batch_loss`): the objective, and its metrics as parts of the step's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rft import algorithms, distributed
from rft.algorithms.objective import MicroInputs, Normalizers, ObjectiveSettings, objective, rollout_weights
from rft.algorithms.policy_losses import SurrogateSettings
from rft.config import AlgorithmConfig
from rft.metrics import ENTROPY, ENTROPY_KEPT_SHARE, KL_OLD, KL_REF
from rft.step_metrics import Accumulator, add_mismatch_stats, add_policy_stats

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "MicroInputs", "Normalizers", "loss_masks", "micro_batch_loss", "normalizers", "objective_settings",
]


def objective_settings(algorithm: AlgorithmConfig, max_completion_length: int) -> ObjectiveSettings:
    """The objective's constants from the recipe's `algorithm` section."""
    mode, low, high = algorithm.rollout_settings or (None, None, None)
    return ObjectiveSettings(
        max_completion_length=max_completion_length, loss=algorithm.loss, eps_low=algorithm.eps_low,
        eps_high=algorithm.eps_high, delta=algorithm.delta,
        importance_sampling_level=algorithm.importance_sampling_level,
        surrogate=SurrogateSettings(
            cispo_eps_low=algorithm.cispo_eps_low, cispo_eps_high=algorithm.cispo_eps_high,
            sapo_tau_pos=algorithm.sapo_tau_pos, sapo_tau_neg=algorithm.sapo_tau_neg,
        ),
        rollout_correction=mode, rollout_low=low, rollout_high=high,  # type: ignore[arg-type]
        beta=algorithm.beta, kl_estimator=algorithm.kl_estimator, loss_agg=algorithm.loss_agg,
        entropy_coef=algorithm.entropy_coef, top_entropy=algorithm.top_entropy_quantile < 1.0,
    )


def needs_sampling_policy_pass(algorithm: AlgorithmConfig) -> bool:
    """True when the loss's mask depends on the sampling policy: its log-probs and entropies must be
    computed for the whole step before the update, even when the update could reuse its own forward."""
    settings = algorithm.rollout_settings
    masking = settings is not None and algorithms.is_masking(settings[0])  # type: ignore[arg-type]
    return masking or algorithm.top_entropy_quantile < 1.0


def loss_masks(
    algorithm: AlgorithmConfig, accelerator: Accelerator, masks: list[torch.Tensor],
    rollout_logps: list[torch.Tensor | None], old_logps: list[torch.Tensor | None],
    old_entropies: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Each micro-batch's tokens that count in the loss (bool): its mask, less the tokens the rollout
    correction drops, less (top_entropy_quantile < 1) those below the step's entropy quantile."""
    if not needs_sampling_policy_pass(algorithm):
        return [mask.bool() for mask in masks]
    settings = objective_settings(algorithm, max_completion_length=1)
    kept = []
    for mask, rollout_logp, old_logp in zip(masks, rollout_logps, old_logps, strict=True):
        assert old_logp is not None
        kept.append(rollout_weights(settings, old_logp, rollout_logp, mask)[1])
    if algorithm.top_entropy_quantile >= 1.0:
        return kept
    # A process may hold padding passes only: the empty start keeps its share a (possibly empty) tensor.
    local = torch.cat([torch.zeros(0, dtype=torch.float64)] + [
        e[m].detach().to("cpu", torch.float64)
        for e, m in zip(old_entropies, kept, strict=True) if e is not None
    ])
    everywhere = torch.cat(distributed.gather_from_processes(accelerator, local))
    threshold = algorithms.top_entropy_threshold(everywhere, algorithm.top_entropy_quantile)
    return [
        algorithms.top_entropy_mask(e, m, threshold.to(m.device)) if e is not None else m
        for e, m in zip(old_entropies, kept, strict=True)
    ]


def normalizers(
    algorithm: AlgorithmConfig, accelerator: Accelerator, masks: list[torch.Tensor]
) -> Normalizers:
    """The global counts of one mini-batch: these masks (this process's) summed over every process."""
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for mask in masks:
        counts = counts + torch.stack([
            algorithms.loss_normalizer(mask, loss_agg=algorithm.loss_agg),
            algorithms.loss_normalizer(mask, loss_agg="token-mean"),
        ]).to(counts.device)
    total = accelerator.reduce(counts, reduction="sum")
    return Normalizers(policy=total[0], tokens=total[1])


def micro_batch_loss(
    algorithm: AlgorithmConfig, inputs: MicroInputs, norm: Normalizers, max_completion_length: int,
    sums: Accumulator,
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch's loss; its metrics go into `sums`."""
    result = objective(objective_settings(algorithm, max_completion_length), inputs, norm)
    metrics = result.metrics
    # Padding micro-batches too (nothing counted), so that every process adds the same metrics.
    add_policy_stats(sums, metrics.policy)
    if metrics.mismatch is not None:
        add_mismatch_stats(sums, metrics.mismatch)
    if metrics.kl_ref_sum is not None:
        sums.add(KL_REF, metrics.kl_ref_sum, metrics.tokens)
    sums.add(ENTROPY, metrics.entropy_sum, metrics.tokens)
    sums.add(KL_OLD, metrics.kl_old_sum, metrics.tokens)
    if metrics.entropy_kept is not None:
        # Of the tokens the rollout correction keeps: the share the entropy mask keeps too.
        sums.add(ENTROPY_KEPT_SHARE, *metrics.entropy_kept)
    return result.loss
