"""What an LLM judge sends and reads (`rewards.judge`): its prompt templates, reply parsing, the reply
cache, and the event-loop thread its requests run on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import sqlite3
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCORE_TEMPLATE = """You are a strict grader. Grade the response to the prompt below against the rubric.

Rubric:
{rubric}

Prompt:
{prompt}
{reference_block}
Response:
{completion}

Explain your grade in at most three sentences, then end with a line of the form "Score: N", \
where N is a number from {min_score} to {max_score}."""

PAIRWISE_TEMPLATE = """You are a strict grader. Two responses answer the same prompt. \
Decide which is better according to the rubric.

Rubric:
{rubric}

Prompt:
{prompt}
{reference_block}
Response A:
{response_a}

Response B:
{response_b}

Explain your choice in at most three sentences, then end with a line "Winner: A", "Winner: B" or \
"Winner: tie"."""

_SCORE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_WINNER = re.compile(r"winner\s*\**\s*[:=]\s*\**\s*(A|B|tie)\b", re.IGNORECASE)
RETRY_STATUS = {408, 409, 429}


class JudgeFailure(RuntimeError):
    """A judge request that failed after its retries, or a reply that could not be parsed."""


def parse_score(reply: str, min_score: float, max_score: float) -> float | None:
    """The last `Score: N` in a reply (or `{"score": N}`, or a bare number), if within the range."""
    found = _SCORE.findall(reply)
    value: float | None = float(found[-1]) if found else None
    if value is None:
        stripped = reply.strip()
        try:
            parsed = json.loads(stripped)
            if isinstance(parsed, dict) and isinstance(parsed.get("score"), int | float):
                value = float(parsed["score"])
            elif isinstance(parsed, int | float) and not isinstance(parsed, bool):
                value = float(parsed)
        except json.JSONDecodeError:
            return None
    if value is None or not min_score <= value <= max_score:
        return None
    return value


def reply_content(body: str) -> str:
    """The message text of a chat completion body; JudgeFailure for any other body (an HTML page or
    truncated JSON served with HTTP 200, a completion without message content)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise JudgeFailure(
            f"judge endpoint answered HTTP 200 with a body that is not JSON: {body[:200]!r}"
        ) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise JudgeFailure(f"judge reply is not a chat completion with message content: {body[:200]!r}")
    return content


def parse_winner(reply: str) -> str | None:
    """'A', 'B' or 'tie' from the last `Winner: ...` in a reply (or a bare A / B / tie)."""
    found = _WINNER.findall(reply)
    answer = found[-1] if found else reply.strip().rstrip(".")
    answer = answer.upper() if answer.lower() != "tie" else "tie"
    return answer if answer in ("A", "B", "tie") else None


@dataclass
class Counters:
    """What one reward call's requests did, for its counters."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    unparseable: int = 0


class ReplyCache:
    """Replies keyed on a request hash: in memory, and in SQLite when a path is given."""

    def __init__(self, path: str | None):
        self.memory: dict[str, str] = {}
        self.lock = threading.Lock()
        self.database: sqlite3.Connection | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.database = sqlite3.connect(path, check_same_thread=False)
            self.database.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)"
            )
            self.database.commit()

    def get(self, key: str) -> str | None:
        with self.lock:
            if key in self.memory:
                return self.memory[key]
            if self.database is not None:
                row = self.database.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    self.memory[key] = row[0]
                    return row[0]
        return None

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.memory[key] = reply
            if self.database is not None:
                self.database.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))
                self.database.commit()

    def close(self) -> None:
        with self.lock:
            if self.database is not None:
                self.database.close()
                self.database = None


class EventLoopThread:
    """An asyncio event loop running in a daemon thread, for coroutines submitted from other threads."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self, last: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> None:
        """Run `last` (clean-up), then stop the loop and its thread."""
        try:
            self.submit(last).result(timeout=timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=timeout_s)
            if not self.thread.is_alive():
                self.loop.close()
