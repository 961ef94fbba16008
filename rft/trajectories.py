"""What the trainer, the evaluator and `rft reward check` sample: n trajectories per example.

A trajectory is everything after its prompt: for a single answer, the completion the engine
sampled; for an agent episode (`rft.agents.episodes`), the model's turns with the environment's
messages between them. `Trajectories` holds them in prompt-major order (the n of example 0, then of
example 1, ...), with what the update needs (token ids, the sampler's log-probs, which tokens are the
model's) and what the rewards need (the completions as text or messages).

`Sampler` is the one interface: `SingleTurn` here, `Episodes` for agents; `rft.agents.sampler_for`
picks one from the recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rft.data import Example
from rft.metrics import Metric
from rft.rollout.base import RolloutEngine
from rft.sampling import SamplingSettings


@dataclass
class Trajectories:
    """n trajectories per example, prompt-major. Per trajectory i:

    `prompt_ids[i]` the prompt it answers (an example's, or its environment's first messages);
    `completion_ids[i]` every token after the prompt; `masks[i][t]` 1 where token t is the model's
    (trained), 0 where the environment's (not trained, not counted); None: every token is the
    model's. `logprobs[i][t]` the sampler's log-probability of a model token (0 for the
    environment's). `truncated[i]`: cut by a length limit rather than ended by the model or the
    environment. `completions[i]` what rewards receive (text, or TRL's chat form: a list of
    messages). `environment_rewards[i]` the environment's reward (None: no environment).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    masks: list[list[int]] | None
    logprobs: list[list[float]] | None
    truncated: list[bool]
    completions: list[Any]
    environment_rewards: list[float] | None = None
    # The rollout's own metrics (agents: turns, tool calls, failures) as (sum, count) parts of means.
    sums: dict[Metric, tuple[float, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


def decode_completions(
    tokenizer: Any, examples: Sequence[Example], completion_ids: Sequence[Sequence[int]], group_size: int
) -> list[Any]:
    """Completion texts (completion i answers `examples[i // group_size]`); after a chat prompt, TRL's
    form: [{"role": "assistant", "content": text}]."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions: list[Any] = []
    for i, text in enumerate(texts):
        chat = examples[i // group_size].is_chat
        completions.append([{"role": "assistant", "content": text}] if chat else text)
    return completions


class Sampler(Protocol):
    """Samples n trajectories for each example with an engine."""

    def sample(
        self, engine: RolloutEngine, examples: Sequence[Example], n: int, sampling: SamplingSettings
    ) -> Trajectories:
        ...

    def close(self) -> None:
        ...


class SingleTurn:
    """One completion per trajectory: the engine's answer to the example's prompt."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def sample(
        self, engine: RolloutEngine, examples: Sequence[Example], n: int, sampling: SamplingSettings
    ) -> Trajectories:
        output = engine.generate([e.prompt_ids for e in examples], n, sampling)
        return Trajectories(
            prompt_ids=[e.prompt_ids for e in examples for _ in range(n)],
            completion_ids=output.completion_ids,
            masks=None,
            logprobs=output.logprobs,
            truncated=output.truncated,
            completions=decode_completions(self.tokenizer, examples, output.completion_ids, n),
        )

    def close(self) -> None:
        """Nothing to release."""
