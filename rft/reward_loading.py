"""The one door between the trainer and the reward plugins (`rewards/`).

Rewards are loaded by spec (`rewards.loading`), never imported by name, so no other `rft` module
imports `rewards`: they import from here the contract types a reward returns or raises
(`rewards.base`), the loader, and the PII detector that `rft data prep` shares with
`rewards.policy`. Torch-free: reward worker processes (`rft.reward_workers`) import this.
"""

from __future__ import annotations

from rewards.base import RewardContractError, RewardValues
from rewards.loading import RewardError, RewardFunction, build_reward, declared_columns, load_function
from rewards.pii import PIIDetector

__all__ = [
    "PIIDetector",
    "RewardContractError",
    "RewardError",
    "RewardFunction",
    "RewardValues",
    "build_reward",
    "declared_columns",
    "load_function",
]
