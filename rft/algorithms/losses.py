"""Policy-gradient surrogates (GRPO, DAPO, GSPO; CISPO and SAPO in `policy_losses`) and their aggregation.

Per-token tensors have shape (B, T): B completions, T the padded completion length. `mask` is 1
(or True) on the completion tokens that count and 0 on padding. Advantages are one scalar per
completion, shape (B,), broadcast to its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal, get_args

import torch

from ._masked import masked_max, masked_sum
from .policy_losses import PolicyLossName, SurrogateSettings, surrogate

ImportanceSamplingLevel = Literal["token", "sequence"]
LossAggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _gspo_token_ratio(log_ratio: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token ratio s_i,t = sg[s_i] * pi_theta(o_i,t) / sg[pi_theta(o_i,t)] (Zheng et al. 2025, Sec. 4.3).

    s_i = exp(mean over the counted tokens of log(pi_theta / pi_old)), GSPO eq. 7: the geometric
    mean of the token ratios.
    """
    log_s = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    # Every token carries the value s_i but the gradient of its own log-prob only; with one
    # advantage per sequence this is GSPO's gradient (s_i * A_i / |o_i| per token after the
    # per-sequence token mean). `where` keeps inf - inf on padding out of the graph.
    own_logp = torch.where(mask, logp - logp.detach(), 0.0)
    return torch.exp(log_s.detach() + own_logp)


def _token_ratio(log_ratio: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The token ratio r_i,t = pi_theta(o_i,t) / pi_old(o_i,t)."""
    return torch.exp(log_ratio)


# importance_sampling_level -> the ratio each token's surrogate sees
_RATIOS = {"token": _token_ratio, "sequence": _gspo_token_ratio}


def _check_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, level: str
) -> None:
    if level not in get_args(ImportanceSamplingLevel):
        expected = get_args(ImportanceSamplingLevel)
        raise ValueError(f"importance_sampling_level {level!r}: expected one of {expected}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one (B, T) shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must have shape (B,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}"
        )


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    eps_low: float, eps_high: float, delta: float | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token", is_weights: torch.Tensor | None = None,
    loss: PolicyLossName = "ppo_clip", settings: SurrogateSettings | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token surrogate loss, (B, T), already multiplied by `mask`, and its statistics.

    `loss` names the surrogate (`rft.algorithms.policy_losses`): `ppo_clip` (the default),
      l_i,t = -min(r_i,t * A_i, clip(r_i,t, 1 - eps_low, 1 + eps_high) * A_i),
    `cispo` (clipped IS weight times A log pi) or `sapo` (a soft sigmoid gate instead of the clip).
    `settings` holds their other constants (CISPO's bounds, SAPO's temperatures); `eps_low`,
    `eps_high` and `delta` given here win over its own.

    - GRPO (Shao et al. 2024, DeepSeekMath eq. 3) with eps_low = eps_high; DAPO's clip-higher
      (Yu et al. 2025) decouples them (0.2 / 0.28).
    - `importance_sampling_level="sequence"`: GSPO (Zheng et al. 2025, eqs. 5 and 7) in its
      GSPO-token form: r_i,t is replaced by s_i,t, whose value is the sequence ratio s_i.
    - `delta` (dual clip of INTELLECT-2, Prime Intellect 2025, as in TRL): the ratio in the
      unclipped term is capped at delta, so a negative-advantage token loses at most delta * |A|.
    - `is_weights`: truncated importance-sampling weights (see `truncated_importance_weights`),
      treated as constants, multiply the per-token loss.

    Padding may hold any log-prob (even inf): it never reaches the loss or its gradient, and a row
    without counted tokens contributes 0.

    Stats (detached 0-dim tensors) are sums over the counted tokens, so that they add across
    micro-batches and processes (a share is a sum divided by `tokens`): `tokens` (counted tokens),
    `clip_low_tokens` (ratio < 1 - eps_low with A < 0), `clip_high_tokens` (ratio > 1 + eps_high
    with A > 0), `clip_region_tokens` (either: the tokens whose gradient the clip removes),
    `ratio_sum`, and `ratio_max` (0 when nothing is counted). For GSPO the ratio is s_i. For CISPO the
    clip counts are the tokens whose IS weight is clipped (whatever the sign of A: their gradient is
    scaled, not removed); SAPO clips nothing.
    """
    _check_inputs(logp, old_logp, advantages, mask, importance_sampling_level)
    counted = mask.bool()
    # The old policy and the advantages are constants of the objective.
    log_ratio = torch.where(counted, logp - old_logp.detach(), 0.0)
    ratio = _RATIOS[importance_sampling_level](log_ratio, logp, counted)
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)

    settings = replace(settings or SurrogateSettings(), eps_low=eps_low, eps_high=eps_high, delta=delta)
    # The log-prob itself enters CISPO's loss: padding's (possibly inf) must not reach it.
    per_token, low, high = surrogate(loss)(ratio, torch.where(counted, logp, 0.0), adv, settings)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    per_token = torch.where(counted, per_token, 0.0)

    stats = {
        "tokens": counted.sum().to(logp.dtype),
        "clip_low_tokens": masked_sum(low.to(logp.dtype), counted),
        "clip_high_tokens": masked_sum(high.to(logp.dtype), counted),
        "clip_region_tokens": masked_sum((low | high).to(logp.dtype), counted),
        "ratio_sum": masked_sum(ratio, counted),
        "ratio_max": masked_max(ratio, counted),
    }
    return per_token, stats


def loss_normalizer(mask: torch.Tensor, *, loss_agg: LossAggregation) -> torch.Tensor:
    """The count that `loss_agg` divides by, over this (B, T) mask: a 0-dim float64 tensor.

    - `token-mean`: the counted tokens, sum_i,t m_i,t.
    - `seq-mean-token-mean`: the sequences with at least one counted token. A row without one (every
      token masked, e.g. by DAPO's overlong filtering) is not a sample: counting it would shrink the
      loss and its gradient by the share of such rows (verl's `agg_loss` leaves them out too).
    - `seq-mean-token-sum-norm`: every row, B. Dr. GRPO's normaliser is a constant of the batch's
      shape, not of its contents.

    Counts add: the normaliser of a batch split into micro-batches (and processes) is the sum of
    theirs, which is what `aggregate_loss` needs for gradient accumulation.
    """
    _check_aggregation(loss_agg)
    counted = mask.bool()
    return _NORMALIZERS[loss_agg](counted).to(torch.float64)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg: LossAggregation,
    max_completion_length: int,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to the 0-dim loss of this micro-batch's share of the batch.

    With N the `normalizer` (see `loss_normalizer`):

    - `seq-mean-token-mean` (GRPO, Shao et al. 2024, DeepSeekMath eq. 3):
      sum_i (sum_t l_i,t / sum_t m_i,t) / N, N = #{i : sum_t m_i,t > 0}; a row without a counted
      token adds nothing and is not counted in N.
    - `token-mean` (DAPO, Yu et al. 2025, token-level policy gradient loss, eq. 8):
      sum_i,t l_i,t / N, N = sum_i,t m_i,t
    - `seq-mean-token-sum-norm` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"):
      sum_i (sum_t l_i,t / max_completion_length) / N, N = the number of rows

    Built for gradient accumulation: `normalizer` is the GLOBAL count of the whole batch (the sum of
    `loss_normalizer` over every micro-batch and every process), so the sum of the results over the
    micro-batches is the loss of the whole batch, and so is its gradient. Dividing by per-micro-batch
    counts instead would weight tokens by the size of the micro-batch they happened to land in.
    Without it, this batch's own count is used. A count below 1 is read as 1, so a batch without
    counted tokens gives 0, not NaN. Tokens outside `mask` are ignored whatever they hold (a KL term
    added to the loss, say).
    """
    _check_aggregation(loss_agg)
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ in shape"
        )
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_agg=loss_agg)
    # A tensor stays on its device: no host sync to read a count. At least float32: bf16 would round it.
    dtype = torch.promote_types(per_token_loss.dtype, torch.float32)
    divisor = torch.as_tensor(normalizer, dtype=dtype, device=per_token_loss.device).clamp(min=1)
    counted = mask.bool()
    loss = torch.where(counted, per_token_loss, 0.0)
    return _NUMERATORS[loss_agg](loss, counted, max_completion_length) / divisor


# loss_agg -> the count it divides by (`loss_normalizer`), from the counted-token mask
_NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "token-mean": lambda counted: counted.sum(),
    "seq-mean-token-mean": lambda counted: counted.any(dim=-1).sum(),
    "seq-mean-token-sum-norm": lambda counted: torch.tensor(counted.shape[0], device=counted.device),
}

# loss_agg -> the sum it divides by its normaliser, from the masked per-token loss
_NUMERATORS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "token-mean": lambda loss, counted, _: loss.sum(),
    "seq-mean-token-mean": lambda loss, counted, _: (
        loss.sum(dim=-1) / counted.sum(dim=-1).clamp(min=1)
    ).sum(),
    "seq-mean-token-sum-norm": lambda loss, counted, length: (loss.sum(dim=-1) / length).sum(),
}


def _check_aggregation(loss_agg: str) -> None:
    if loss_agg not in get_args(LossAggregation):
        raise ValueError(f"loss_agg {loss_agg!r}: expected one of {get_args(LossAggregation)}")
