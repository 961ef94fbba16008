"""Environments and a tool for the agent tests, loaded by spec as a recipe would (`tests/agent_envs.py:X`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rft.environment import Environment, Message, Step


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def explode(text: str) -> str:
    """Fail on purpose.

    Args:
        text: Anything.
    """
    raise RuntimeError(f"tool failed on {text!r}")


class RetryOnce(Environment):
    """Says "wrong, try again" once to a wrong answer; 1 for a right first answer, 0.5 for a right second."""

    def step(self, message: Message) -> Step:
        right = message["content"].strip() == str(self.row["answer"])
        first = sum(m["role"] == "assistant" for m in self.history) == 0
        self.history = [*self.history, message]
        if right:
            return Step(done=True, reward=1.0 if first else 0.5)
        if first:
            return Step(messages=[{"role": "user", "content": "Wrong, try again."}])
        return Step(done=True, reward=0.0)

    def __init__(self, row: dict[str, Any]):
        super().__init__(row)
        self.history: list[Message] = []


class NeverDone(Environment):
    """Answers every turn with "Go on." and never ends the episode."""

    def step(self, message: Message) -> Step:
        return Step(messages=[{"role": "user", "content": "Go on."}], reward=0.25)


class Calculator(Environment):
    """Offers `add`; scores 1 when the final answer (a turn without tool calls) is the row's answer."""

    tools = (add,)

    def reward(self, conversation: list[Message]) -> float:
        return float(conversation[-1]["content"].strip() == str(self.row["answer"]))


class Raises(Environment):
    def step(self, message: Message) -> Step:
        raise ValueError("the environment broke")


class AsyncRetryOnce(RetryOnce):
    """`RetryOnce` with async methods: the rollout awaits them."""

    async def step(self, message: Message) -> Step:  # type: ignore[override]
        await asyncio.sleep(0)
        return RetryOnce.step(self, message)

    async def reward(self, conversation: list[Message]) -> float:  # type: ignore[override]
        return 0.125


class RandomStart(Environment):
    """Opens each episode differently: not allowed within a group."""

    count = 0

    def reset(self) -> list[Message]:
        RandomStart.count += 1
        return [{"role": "user", "content": f"Question {RandomStart.count}"}]


class Hangs(Environment):
    """A sync `step` that never returns in time."""

    def step(self, message: Message) -> Step:
        time.sleep(30)
        return Step(done=True)


class BadMessages(Environment):
    """Answers with something that is no list of messages."""

    def step(self, message: Message) -> Step:
        return Step(messages=["not a message"])  # type: ignore[list-item]


class CannotOpen(Environment):
    def reset(self) -> list[Message]:
        raise KeyError("question")
