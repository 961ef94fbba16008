"""What a reward sees of the run beyond its batch: TRL's `trainer_state`, `log_metric` and `log_extra`.

TRL's GRPOTrainer (1.16) passes every reward three more keyword arguments, and rft does the same:

- `trainer_state`: a `RewardState` with TRL's names, `global_step` (training steps completed before
  this batch: 0 during the first step, as in TRL), `max_steps` (`training.steps`) and `epoch`
  (passes over the training rows so far, fractional), for rewards that change with training
  progress (curricula). It is a small picklable record, not the trainer, so it reaches rewards in
  worker processes too; held-out evaluations see the state of the step they follow.
- `log_metric(name, value)`: a scalar for the step's metrics. As in TRL, values are averaged over
  the step (every call, every process, every dynamic-sampling round) and logged under `name` as given,
  in `metrics.jsonl` (and the trackers, and the last step's row in the report's `summary.json`); names
  under `reward/` are the scorer's own and refused.
- `log_extra(column, values)`: one value per completion of the call, written beside those
  completions in `completions.jsonl` under `"extra"` (TRL's completions table).

A reward receives them only when it can take them: a parameter of that name, or `**kwargs` (TRL
passes them always, so there a reward without `**kwargs` fails; here it is simply not given them).
Rewards may run in worker processes (`rft.reward_workers`), which a callable into the trainer cannot
reach: each call gets a `RewardLog` whose methods record what was logged, and the record travels back
with the call's result for the scorer to merge. Torch-free, like the workers that import it.

It also holds the one set of text helpers for prompts and completions, shared by `rft` and the
plugins (`rewards.base` re-exports them): `completion_text` (the assistant's text only),
`prompt_text` (every message's text, one per line) and `conversation_text` (every message's content
joined as it is, for display and exact match).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTEXT_ARGUMENTS = ("trainer_state", "log_extra", "log_metric")
RESERVED_PREFIX = "reward/"


@dataclass(frozen=True)
class RewardState:
    """The training progress a reward sees as `trainer_state` (names as in transformers' TrainerState)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class RewardLog:
    """One reward call's `log_metric` / `log_extra`: records them, to be merged by the scorer."""

    size: int  # completions in the call
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, list[Any]] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        name = str(name)
        if name.startswith(RESERVED_PREFIX):
            # The scorer's own metrics live there, and a logged value of the same name would merge into them.
            raise ValueError(
                f"log_metric({name!r}): names under {RESERVED_PREFIX!r} are the scorer's; choose another"
            )
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"log_metric({name!r}, {value!r}): the value must be a finite number")
        self.metrics.setdefault(name, []).append(number)

    def log_extra(self, column: str, values: list[Any]) -> None:
        values = list(values)
        if len(values) != self.size:
            # TRL would append them out of line with the completions; here the call fails and says so.
            raise ValueError(
                f"log_extra({column!r}): {len(values)} values for the call's {self.size} completions"
            )
        self.extras[str(column)] = values


def accepted_context(function: Any) -> tuple[str, ...]:
    """The context arguments `function` can take: those it names, or all of them with `**kwargs`."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read, give nothing
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return CONTEXT_ARGUMENTS
    return tuple(
        name for name in CONTEXT_ARGUMENTS
        if name in parameters and parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)
    )


def context_kwargs(accepted: tuple[str, ...], state: RewardState, log: RewardLog) -> dict[str, Any]:
    """The keyword arguments of one call for a reward that takes `accepted`."""
    available = {"trainer_state": state, "log_extra": log.log_extra, "log_metric": log.log_metric}
    return {name: available[name] for name in accepted}


def call_reward(
    function: Any, accepted: tuple[str, ...], kwargs: dict[str, Any], state: RewardState
) -> tuple[Any, RewardLog]:
    """Call a reward with its batch and the context it takes: (its value, possibly awaitable; its log)."""
    log = RewardLog(len(kwargs["completions"]))
    return function(**kwargs, **context_kwargs(accepted, state, log)), log


# ------------------------------------------------------------------------ text of prompts and completions
def content_text(content: Any) -> str:
    """Text of a message `content`: a string, or a list of parts (`{"type": "text", "text": ...}` or
    `{"text": ...}`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the assistant messages' text for chat completions."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        return "\n".join(
            content_text(message.get("content"))
            for message in completion
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant"
        )
    return str(completion)


def prompt_text(prompt: Any) -> str:
    """All text of a prompt: the string itself, or every message's text joined by newlines."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return "\n".join(content_text(m.get("content")) for m in prompt if isinstance(m, Mapping))
    return str(prompt)


def conversation_text(messages: Any) -> str:
    """Display text of a conversation: every message as a "role: content" line; a plain string as it is."""
    if isinstance(messages, str):
        return messages
    return "\n".join(f"{message.get('role')}: {content_text(message.get('content'))}" for message in messages)
