"""A second chance: the model answers; a wrong first answer is told "wrong, try again" once.

The reward teaches getting it right the first time while still paying for a correction: 1.0 for a
right first answer, 0.5 for a right second one, 0 otherwise. Right means the last number of the
answer equals the row's `answer` (as `rewards/arithmetic.py:final_number_correct` reads it).

Recipe: `environment: ../environments/retry.py:RetryOnce` with `rollout.max_turns: 2` (see
`recipes/agent_retry.yaml`). Rows need an `answer` column.
"""

from __future__ import annotations

from typing import Any

from rewards.arithmetic import final_number_correct
from rft.environment import Environment, Message, Step

FIRST_TRY_REWARD = 1.0
SECOND_TRY_REWARD = 0.5
TRY_AGAIN = "Wrong, try again. Answer with the number only."


class RetryOnce(Environment):
    """One episode: an answer, and after a wrong one, one more try."""

    def __init__(self, row: dict[str, Any]):
        super().__init__(row)
        self.answers = 0

    def step(self, message: Message) -> Step:
        self.answers += 1
        if self._right(message) or self.answers > 1:
            return Step(done=True)
        return Step(messages=[{"role": "user", "content": TRY_AGAIN}])

    def reward(self, conversation: list[Message]) -> float:
        """Scored from the conversation, so that an answer cut at max_new_tokens (which ends the episode
        before any `step`) is judged too, as a single-turn reward would judge it."""
        answers = [message for message in conversation if message["role"] == "assistant"]
        if self._right(answers[0]):
            return FIRST_TRY_REWARD
        return SECOND_TRY_REWARD if len(answers) > 1 and self._right(answers[1]) else 0.0

    def _right(self, message: Message) -> bool:
        return final_number_correct([message["content"]], [self.row["answer"]])[0] == 1.0
