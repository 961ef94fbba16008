"""Correction for the rollout/trainer mismatch: the sampling engine's log-probs differ from the
trainer's for the same tokens (other kernels, precision, batching), so the samples are slightly
off-policy even at the first update. Truncated importance sampling (TIS; Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training") reweights each token by
min(pi_trainer / pi_rollout, C); `rollout_correction` adds masking (MIS), the sequence-level and
geometric-mean ratios, and IcePop's two-sided token mask, looked up by mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

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
    pi_trainer / pi_rollout (0 when nothing is counted); `rollout_kl_sum`: sum of the k3 estimate of
    KL(pi_rollout || pi_trainer), exp(x) - x - 1 with x = log pi_trainer - log pi_rollout (Schulman 2020;
    the samples come from the rollout policy, so this is the KL that k3 estimates without bias).
    """
    counted = mask.bool()
    log_ratio = _log_ratio(trainer_logp, rollout_logp, counted)
    return {
        "tokens": counted.sum().to(log_ratio.dtype),
        "mismatch_abs_sum": masked_sum(log_ratio.abs(), counted),
        "mismatch_ratio_max": masked_max(log_ratio.exp(), counted),
        # expm1: the two policies are close, where exp(x) - 1 would cancel to nothing.
        "rollout_kl_sum": masked_sum(torch.expm1(log_ratio) - log_ratio, counted),
    }


def truncated_importance_weights(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIS weights min(exp(trainer_logp - rollout_logp), cap), (B, T), detached, 0 off `mask`:
    `rollout_correction` in mode `token_truncate` with the upper bound `cap`.

    Stats: those of `rollout_mismatch` (the max ratio is taken before capping) and
    `tis_capped_tokens`, how many counted tokens have a ratio above `cap`.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    weights, _, stats = rollout_correction(
        trainer_logp, rollout_logp, mask, mode="token_truncate", low=None, high=cap
    )
    return weights, stats


RolloutCorrection = Literal[
    "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "geometric_truncate",
    "geometric_mask", "icepop",
]


def _token_level(log_ratio: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _sequence_level(log_ratio: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # The product of the token ratios: the likelihood ratio of the whole completion.
    return log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)


def _geometric_level(log_ratio: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # The geometric mean of the token ratios: unlike the product, its spread does not grow with the length.
    mean = log_ratio.sum(dim=-1, keepdim=True) / counted.sum(dim=-1, keepdim=True).clamp(min=1)
    return mean.expand_as(log_ratio)


# mode -> (the log-ratio each token is weighted by, whether ratios out of bounds are masked or truncated)
_CORRECTIONS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "token_truncate": (_token_level, False),
    "token_mask": (_token_level, True),
    "sequence_truncate": (_sequence_level, False),
    "sequence_mask": (_sequence_level, True),
    "geometric_truncate": (_geometric_level, False),
    "geometric_mask": (_geometric_level, True),
    "icepop": (_token_level, True),
}

# IcePop's [alpha, beta] (Ling Team 2025, "Small Leak Can Sink a Great Ship", and the Ring-1T report).
ICEPOP_BOUNDS = (0.5, 5.0)


def is_masking(mode: RolloutCorrection) -> bool:
    """True where `mode` drops tokens from the loss (its mask depends on the log-probs, not only the
    batch)."""
    _check_mode(mode)
    return _CORRECTIONS[mode][1]


def rollout_correction(
    trainer_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: RolloutCorrection,
    low: float | None,
    high: float | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights against the rollout/trainer mismatch, the mask they leave, and their statistics.

    With rho_t = pi_trainer(o_t) / pi_rollout(o_t) on the counted tokens, the weight of token t is
      - `token_*`: rho_t (TIS / MIS: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
        Off-Policy RL Training"; Liu et al. 2025, "When Speed Kills Stability", token-level IS),
      - `sequence_*`: rho = prod_t rho_t = exp(sum_t log rho_t), one weight for every token of the sequence
        (Liu et al. 2025, sequence-level IS; TRL's `vllm_importance_sampling_mode` sequence modes),
      - `geometric_*`: exp(mean_t log rho_t), the geometric mean (the GSPO form, eq. 7, of the same ratio),
    and then
      - `*_truncate`: weight clamp(rho, low, high) (a bound None is no bound), every token kept;
      - `*_mask`: weight rho where low <= rho <= high, and the token (or sequence) leaves the mask otherwise;
      - `icepop`: `token_mask` with IcePop's two-sided bounds [0.5, 5] by default (Ling Team 2025, Ring-1T
        report, arXiv 2510.18855: M(k; alpha, beta) = k if k in [alpha, beta], else 0).

    A masked token leaves the loss's mask, not only its weight: a rejected token (or sequence) is not a
    sample, so it leaves the normaliser too (as overlong filtering does; TRL and IcePop's objective keep it in
    the denominator, which shrinks the loss by the masked share).

    Returns (weights (B, T) detached and 0 off the returned mask, the mask (bool), stats). Stats are sums
    over the counted tokens of the input `mask`: those of `rollout_mismatch`, and `masked_tokens` (mask
    modes: the counted tokens dropped) or `tis_capped_tokens` (truncate modes: the tokens whose weight
    the bounds changed).
    """
    low, high = _bounds(mode, low, high)
    level, masks = _CORRECTIONS[mode]
    counted = mask.bool()
    token_log_ratio = _log_ratio(trainer_logp, rollout_logp, counted)
    ratio = level(token_log_ratio, counted).exp()
    below = ratio < low if low is not None else torch.zeros_like(counted)
    above = ratio > high if high is not None else torch.zeros_like(counted)
    outside = (below | above) & counted
    if masks:
        kept = counted & ~outside
        weights = torch.where(kept, ratio, 0.0)
    else:
        kept = counted
        weights = torch.where(counted, ratio.clamp(min=low, max=high), 0.0)
    stats = rollout_mismatch(trainer_logp, rollout_logp, mask)
    stats["masked_tokens" if masks else "tis_capped_tokens"] = masked_sum(outside.to(ratio.dtype), counted)
    return weights, kept, stats


def _bounds(
    mode: RolloutCorrection, low: float | None, high: float | None
) -> tuple[float | None, float | None]:
    """The bounds `mode` uses (IcePop's defaults filled in), refused where they cannot work."""
    _check_mode(mode)
    if mode == "icepop":
        low = ICEPOP_BOUNDS[0] if low is None else low
        high = ICEPOP_BOUNDS[1] if high is None else high
    if low is None and high is None:
        raise ValueError(f"rollout correction {mode!r} needs a bound (low, high or both)")
    if mode.startswith("sequence") and high is None:
        # A product of hundreds of ratios overflows (e^89 is inf in float32): its weight needs a ceiling.
        raise ValueError(f"rollout correction {mode!r} needs an upper bound (high)")
    if (low is not None and low < 0) or (high is not None and high <= 0) or (
        low is not None and high is not None and low > high
    ):
        raise ValueError(
            f"rollout correction bounds must satisfy 0 <= low <= high, 0 < high; got {low}, {high}"
        )
    return low, high


def _check_mode(mode: str) -> None:
    if mode not in _CORRECTIONS:
        raise ValueError(f"rollout correction {mode!r}: expected one of {tuple(_CORRECTIONS)}")
