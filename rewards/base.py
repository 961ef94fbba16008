"""The small public helper API for reward plugins.

A reward is a plain callable with the TRL signature::

    def my_reward(completions: list, **columns) -> list[float | None]

To report more than one number per completion (rubric components, a Bedrock Lambda's
`metrics_list`) or counters (judge cache hits, retries), return a `RewardValues`: it *is* a list of
floats, so TRL and any other caller that expects a plain list keep working, and rft's scorer also
logs what it carries::

    return RewardValues(scores, components={"grounded": grounded, "concise": concise},
                        counters={"cache_hits": hits})

`components` are per-completion values (aligned with `completions`, `None` = not applicable) that
the scorer averages and logs as `reward/<name>/<component>/mean`; `counters` are counts that the
scorer sums over the calls of a batch and logs as `reward/<name>/<counter>`.

A reward that needs something of the machine (a sandbox, a server) can say at once whether it will
work: give it a `preflight` attribute, a callable that takes any of the reward's recipe kwargs and
raises `RewardContractError` with what is missing. The scorer runs it when it is built, so
`rft train` and `rft reward check` stop in one line before any model loads (`rewards.code` does).

The other helpers turn the shapes rows and completions come in (strings, chat message lists,
content-part lists, Bedrock `reference_answer` objects) into text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The text helpers live with the trainer's public helper so that `rft` uses the same ones; re-exported
# here, where plugins look for them.
from rft.reward_context import completion_text, content_text, conversation_text, prompt_text

__all__ = [
    "RewardContractError",
    "RewardValues",
    "column",
    "completion_text",
    "content_text",
    "conversation_text",
    "prompt_messages",
    "prompt_text",
    "reference_value",
]


class RewardContractError(Exception):
    """A reward broke its contract (wrong number of values, results for unknown ids): raising it
    stops the run at once whatever `scoring.on_error` says, since every later batch would fail too."""


class RewardValues(list):
    """A list of rewards that also carries per-completion components and counters for logging."""

    def __init__(
        self,
        values: Iterable[float | None],
        *,
        components: Mapping[str, Sequence[float | None]] | None = None,
        counters: Mapping[str, float] | None = None,
    ):
        super().__init__(values)
        self.components: dict[str, list[float | None]] = {k: list(v) for k, v in (components or {}).items()}
        self.counters: dict[str, float] = dict(counters or {})
        for key, series in self.components.items():
            if len(series) != len(self):
                raise ValueError(f"component {key!r} has {len(series)} values for {len(self)} rewards")


def prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence):
        return [dict(message) for message in prompt]
    raise TypeError(f"a prompt is a string or a list of messages, got {type(prompt).__name__}")


# Keys under which Bedrock RFT examples and common datasets keep the answer inside a
# `reference_answer` object, tried in this order when the recipe names none.
_ANSWER_KEYS = ("final_answer", "answer", "reference_answer", "ground_truth", "solution", "label")


def reference_value(value: Any, key: str | None = None) -> Any:
    """The answer inside a reference: `value[key]` for a dict when `key` is given, else the dict's one
    value or its first well-known answer key; other values are returned as they are."""
    if not isinstance(value, Mapping):
        return value
    if key is not None:
        if key not in value:
            raise KeyError(f"reference {value!r} has no key {key!r}")
        return value[key]
    if len(value) == 1:
        return next(iter(value.values()))
    for candidate in _ANSWER_KEYS:
        if candidate in value:
            return value[candidate]
    raise KeyError(
        f"reference {value!r}: several keys and none of {_ANSWER_KEYS}; set `answer_key` in the recipe"
    )


def column(columns: Mapping[str, Any], name: str, count: int, reward: str) -> list[Any]:
    """The dataset column `name` (one value per completion), or one clear error naming the reward."""
    if name not in columns:
        # Not rows' columns: the token ids and the trainer's context arguments (rft.reward_context).
        skipped = ("completion_ids", "trainer_state", "log_extra", "log_metric")
        available = ", ".join(sorted(k for k in columns if k not in skipped)) or "none"
        raise KeyError(f"reward {reward} needs a column {name!r}; the rows have: {available}")
    values = list(columns[name])
    if len(values) != count:
        raise ValueError(f"reward {reward}: column {name!r} has {len(values)} values for {count} completions")
    return values
