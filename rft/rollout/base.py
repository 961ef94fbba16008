"""The rollout-engine interface: prompts in, completion token ids and per-token log-probs out.

Engines know nothing of the trainer. The trainer calls `generate`, and after each optimizer step
`sync_weights(policy)` so the engine samples from the updated policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rft.config import ConfigError
from rft.sampling import SamplingSettings


class EngineStartError(ConfigError):
    """The recipe's rollout engine cannot run on this machine; the message says why, in one line.

    A `ConfigError` so that `rft train` reports it like any other recipe that cannot run: one
    line naming the recipe field, no traceback.
    """


@dataclass
class RolloutOutput:
    """Completions in prompt-major order: the n completions of prompt 0, then of prompt 1, ...

    `logprobs[i][t]` is the sampler's log-probability of `completion_ids[i][t]`; `truncated[i]`
    says the completion hit `max_new_tokens` without an end-of-sequence token.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    truncated: list[bool]


def check_weights(engine: RolloutEngine, step: int) -> None:
    """Refuse to sample step `step` from weights other than those after step `step - 1`'s update."""
    if engine.weights_step != step - 1:
        raise RuntimeError(
            f"the {engine.name} engine holds the weights after step {engine.weights_step}; step {step} "
            f"must sample from those after step {step - 1} (a weight sync was missed)"
        )


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Tokens that end a completion, alike for every engine: the generation config's and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class RolloutEngine(Protocol):
    """An engine samples from the weights of the model it was built with, from its first `generate`
    on (whatever files it started from); after an update, `sync_weights` brings it up to date.

    `weights_step`: the training step whose update the engine's weights include (0: none yet).
    `reads_policy`: the engine generates with the training model itself, so a sharded model
    (FSDP2, ZeRO-3) must be whole while it samples. `tensor_parallel_size`: consecutive processes
    that share one engine and sample the same prompts.
    """

    name: str
    weights_step: int
    reads_policy: bool
    tensor_parallel_size: int

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings
    ) -> RolloutOutput:
        """Sample `n` completions for each prompt (token ids, no padding)."""
        ...

    def sync_weights(self, policy: torch.nn.Module, step: int | None = None) -> None:
        """Make the engine sample from `policy`'s current weights, those after step `step`'s update (None:
        a sync outside the training loop, the recorded step stays)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
