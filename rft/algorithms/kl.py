"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020,
"Approximating KL Divergence"). With x = log pi_ref(o_t) - log pi_theta(o_t):

  k1 = -x                  unbiased, can be negative
  k2 = x^2 / 2             biased, low variance, >= 0
  k3 = exp(x) - x - 1      unbiased, >= 0; the estimator of GRPO (DeepSeekMath eq. 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]

_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda x: -x,
    "k2": lambda x: 0.5 * x.square(),
    # expm1 avoids cancelling exp(x) against 1 when the policies are close, where k3 ~ x^2 / 2.
    "k3": lambda x: torch.expm1(x) - x,
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL estimate, same shape as `logp`, unmasked (the caller masks and aggregates).

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2; k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1.
    Gradients flow into `logp` only: the reference policy is a constant.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r}: expected one of {tuple(_ESTIMATORS)}")
    return _ESTIMATORS[estimator](ref_logp.detach() - logp)
