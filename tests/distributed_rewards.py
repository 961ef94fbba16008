"""Reward functions for the multi-process tests (loaded by file path from their recipes)."""

from __future__ import annotations

import os
import signal
from typing import Any


def first_token_grade(completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
    """(first token id mod 5) / 4: a reward that varies inside a group even for a random model."""
    return [(ids[0] % 5) / 4 if ids else 0.0 for ids in completion_ids]


def second_process_fails(completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
    """On process 1, hang (SIGSTOP, as a wedged process or a
    vanished node would) or die, per $RFT_TEST_FAILURE."""
    if os.environ.get("RANK") == "1":
        if os.environ["RFT_TEST_FAILURE"] == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os._exit(3)
    return first_token_grade(completions, completion_ids)


def killed_in_step(
    completions: list[Any], completion_ids: list[list[int]], trainer_state: Any, **_: Any
) -> list[float]:
    """Every process is killed (SIGKILL: no handler, no checkpoint) while scoring step $RFT_TEST_KILL_STEP."""
    if trainer_state.global_step + 1 == int(os.environ.get("RFT_TEST_KILL_STEP", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return first_token_grade(completions, completion_ids)
