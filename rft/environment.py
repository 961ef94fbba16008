"""The contract of an agent environment: what a multi-turn rollout talks to between the model's turns.

An environment plugin (a recipe's `environment: path/to/env.py:Factory`) imports only this module.
The trainer builds one environment per trajectory, `Factory(row)`, where `row` holds the data row's
fields (after `data.column_map`) and `"prompt"`, the prompt messages the data gives that row. Then:

1. `reset()` gives the first messages (by default the row's prompt). The G trajectories of a group
   are one prompt's answers, so every environment built from a row must give the same ones.
2. The model answers; `step(message)` gets that assistant message (`{"role": "assistant",
   "content": text, "tool_calls": [...]}` when the model called tools) and returns a `Step`: the
   messages the environment adds (tool results, a user turn), whether the episode is done, and an
   optional reward for the turn.
3. Repeat until a step says done, `rollout.max_turns` answers, or the trajectory's token budget
   (`rollout.max_trajectory_tokens`) runs out (then the trajectory counts as truncated).
4. `reward(conversation)` may score the whole conversation (every message after the prompt); the
   trajectory's environment reward is the turn rewards plus this, and adds to the recipe's rewards.

`step` and `reward` may be `async def`; the rollout awaits them, all live trajectories together.
An environment that raises or outlives `rollout.environment_timeout_s` ends its trajectory, which
then scores 0 from the environment; the failure is counted in the step's metrics, never fatal.

Tools are module-level Python functions with type hints and a Google-style docstring (their JSON
schema is read from them, as transformers' `get_json_schema` does), offered to the model through
the chat template's `tools=`. An environment lists its own in `tools`; a recipe's `tools:
[path.py:function, ...]` adds more (with no environment, the base `Environment` serves). The
rollout runs the calls the model makes, each in a worker process bounded in time and memory, and
answers with their results (a malformed call or a failing tool is answered with an error message);
`step` sees only the turns without tool calls, which by default end the episode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass
class Step:
    """What the environment does after one assistant turn."""

    messages: list[Message] = field(default_factory=list)  # appended to the conversation, not trained on
    done: bool = False
    reward: float | None = None  # this turn's reward, summed over the episode


class Environment:
    """One episode. Subclass it, or write any class with these methods; a class is its own factory."""

    tools: Sequence[Callable[..., Any]] = ()

    def __init__(self, row: dict[str, Any]):
        self.row = row

    def reset(self) -> list[Message]:
        """The first messages: by default the row's prompt (a plain-text prompt as one user message)."""
        prompt = self.row["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, message: Message) -> Step | Awaitable[Step]:
        """The environment's answer to an assistant message without tool calls. By default: the end."""
        return Step(done=True)

    def reward(self, conversation: list[Message]) -> float | Awaitable[float | None] | None:
        """A reward for the whole conversation after the prompt (None: none beyond the turn rewards)."""
        return None
