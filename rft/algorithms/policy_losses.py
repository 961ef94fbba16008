"""The per-token policy-gradient surrogates of `algorithm.loss`, looked up by name.

Each takes the ratio r (B, T) (the token ratio, or GSPO's sequence ratio in GSPO-token form), the
current log-probs, the advantages (B, 1) and the settings, and returns the per-token loss and the
tokens its clip acts on below and above (bool). Masking and aggregation are the caller's
(`rft.algorithms.losses.policy_loss`, `aggregate_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

PolicyLossName = Literal["ppo_clip", "cispo", "sapo"]


@dataclass(frozen=True)
class SurrogateSettings:
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    # CISPO's bounds on the IS weight: [1 - cispo_eps_low, 1 + cispo_eps_high]; None is no bound.
    cispo_eps_low: float | None = None
    cispo_eps_high: float | None = 4.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05


Surrogate = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, SurrogateSettings],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


def ppo_clip(
    ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, s: SurrogateSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (PPO, Schulman et al. 2017, eq. 7; GRPO,
    DeepSeekMath eq. 3), the unclipped r first capped at `delta` when set (dual clip, INTELLECT-2).

    Clipped tokens: r < 1 - eps_low with A < 0, r > 1 + eps_high with A > 0 (their gradient is 0).
    """
    unclipped = ratio if s.delta is None else ratio.clamp(max=s.delta)
    clipped = ratio.clamp(1 - s.eps_low, 1 + s.eps_high)
    per_token = -torch.minimum(unclipped * adv, clipped * adv)
    return per_token, (ratio < 1 - s.eps_low) & (adv < 0), (ratio > 1 + s.eps_high) & (adv > 0)


def cispo(
    ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, s: SurrogateSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l = -sg[clip(r, 1 - eps_low^IS, 1 + eps_high^IS)] A log pi_theta (CISPO, MiniMax-M1, MiniMax et al.
    2025, arXiv 2506.13585, Sec. 3.1 eqs. 3-4).

    The IS weight is clipped, not the update: every token keeps a gradient, scaled by the weight, so the
    rare high-ratio tokens that PPO's clip silences still learn. The paper sets no lower bound
    (`cispo_eps_low` None) and tunes only the upper one; ScaleRL (Khatri et al. 2025) uses a cap of 5,
    hence the default `cispo_eps_high` 4. Clipped tokens: those whose weight the clip changes.
    """
    low = 1 - s.cispo_eps_low if s.cispo_eps_low is not None else None
    high = 1 + s.cispo_eps_high if s.cispo_eps_high is not None else None
    weight = ratio.detach().clamp(min=low, max=high)
    per_token = -weight * adv * logp
    below = ratio < low if low is not None else torch.zeros_like(ratio, dtype=torch.bool)
    above = ratio > high if high is not None else torch.zeros_like(ratio, dtype=torch.bool)
    return per_token, below, above


def sapo(
    ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, s: SurrogateSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l = -f(r) A with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos where A > 0 and
    tau_neg otherwise (SAPO, Gao et al. 2025, arXiv 2511.20347, Sec. 3).

    The gradient is 4 p (1 - p) r A grad log pi with p = sigmoid(tau (r - 1)): exactly the plain policy
    gradient at r = 1, fading smoothly as r leaves 1, faster for tau_neg > tau_pos (negative updates
    are the riskier ones). Nothing is clipped: no token counts as clipped.
    """
    tau = torch.where(adv > 0, s.sapo_tau_pos, s.sapo_tau_neg).to(ratio.dtype)
    per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return per_token, none, none


_SURROGATES: dict[str, Surrogate] = {"ppo_clip": ppo_clip, "cispo": cispo, "sapo": sapo}


def surrogate(name: PolicyLossName) -> Surrogate:
    """The surrogate registered under `name`."""
    if name not in _SURROGATES:
        raise ValueError(f"loss {name!r}: expected one of {tuple(_SURROGATES)}")
    return _SURROGATES[name]
