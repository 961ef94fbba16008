"""LLM-as-judge: score completions with a rubric prompt sent to any OpenAI-compatible chat endpoint.

Works with a local `vllm serve MODEL` (`base_url: http://127.0.0.1:8000/v1`), Amazon Bedrock's
OpenAI-compatible endpoint (`https://bedrock-runtime.<region>.amazonaws.com/openai/v1` with a
Bedrock API key), or OpenAI itself. It uses the official `openai` client: it speaks every one of
these endpoints, sends the key as each expects, and maps HTTP failures to typed errors. Retries are
done here, not by the client (`max_retries=0`), so they can be counted in the metrics and their
backoff set from the recipe.

Two modes:

- `score`: one request per completion; the judge ends its reply with `Score: N` (N between
  `min_score` and `max_score`), normalised to [0, 1] unless `normalize: false`.
- `pairwise`: the completions of one prompt (a group) are compared two by two, in both orders
  unless `both_orders: false` (cancelling the judge's position bias); the judge ends with
  `Winner: A`, `Winner: B` or `Winner: tie`. A completion's reward is its share of wins (a tie is
  half a win). G completions cost G(G-1) requests (both orders).

Failures are explicit: `on_failure` (required) says what a request that still fails after the
retries, a body that is not a chat completion (an HTML error page served with HTTP 200, truncated
JSON), or a reply that cannot be parsed, scores: a number (e.g. 0), `null` (not applicable: left
out of the mean and adding 0), or `error` (the call raises, and `scoring.on_error` decides).

Limits: at most `concurrency` requests in flight per judge (shared by all calls), `timeout_s` per
request for all of it (connect, headers and body: a server that trickles its reply a byte at a time
is cut off at the deadline, not only one that goes silent), `retries` with exponential backoff from
`backoff_s` (honouring Retry-After). Requests run on an event loop in one daemon thread, where a
deadline cancels a request wherever it waits and closes its connection; so no request outlives its
deadline, and none keeps the process alive. `close()` (called by `RewardScorer.close()` at the end
of training) cancels what is in flight and closes the HTTP client and the cache. Replies are
cached in memory, and in SQLite at `cache_path` when given, keyed on the model and the exact
request (rubric, prompt and completion), so a repeated completion costs nothing.

Recipe::

    rewards:
      - fn: rewards.judge:LLMJudge
        kwargs:
          base_url: http://127.0.0.1:8000/v1
          model: Qwen/Qwen2.5-7B-Instruct
          rubric: "Is the answer correct, polite and grounded in the policy excerpt?"
          on_failure: null
          api_key_env: OPENAI_API_KEY     # unset or empty: no key (a local vLLM)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import json
import os
import random
from collections.abc import Sequence
from typing import Any

from rewards.base import RewardValues, completion_text, prompt_text
from rewards.judge_replies import (
    PAIRWISE_TEMPLATE,
    RETRY_STATUS,
    SCORE_TEMPLATE,
    Counters,
    EventLoopThread,
    JudgeFailure,
    ReplyCache,
    parse_score,
    parse_winner,
    reply_content,
)

__all__ = ["PAIRWISE_TEMPLATE", "SCORE_TEMPLATE", "JudgeFailure", "LLMJudge", "parse_score", "parse_winner",
           "reply_content"]

_MISSING = object()


def _check_settings(on_failure: Any, mode: str, min_score: float, max_score: float) -> None:
    """ValueError naming the first setting a judge cannot work with."""
    if on_failure is _MISSING:
        raise ValueError(
            "LLMJudge: set `on_failure`: a number (e.g. 0), null (not applicable) or error (raise) "
            "for requests that fail and replies that cannot be parsed"
        )
    if isinstance(on_failure, str) and on_failure != "error":
        raise ValueError(f"LLMJudge: on_failure {on_failure!r}; use a number, null or error")
    if mode not in ("score", "pairwise"):
        raise ValueError(f"LLMJudge: mode {mode!r}; use score or pairwise")
    if max_score <= min_score:
        raise ValueError(f"LLMJudge: max_score {max_score} must exceed min_score {min_score}")


class LLMJudge:
    """See the module docstring."""

    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str,
        on_failure: float | str | None = _MISSING,  # type: ignore[assignment]
        mode: str = "score",
        api_key_env: str | None = "OPENAI_API_KEY",
        min_score: float = 0.0,
        max_score: float = 10.0,
        normalize: bool = True,
        both_orders: bool = True,
        reference_column: str | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        concurrency: int = 8,
        retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        cache_path: str | None = None,
    ):
        try:  # optional dependency: only a judge needs it
            import openai
        except ImportError as exc:
            raise ValueError("LLMJudge needs the `openai` package: pip install openai") from exc
        _check_settings(on_failure, mode, min_score, max_score)
        self.__name__ = f"judge_{mode}"
        self.openai = openai
        self.model = model
        self.rubric = rubric
        self.on_failure = on_failure
        self.mode = mode
        self.min_score, self.max_score, self.normalize = min_score, max_score, normalize
        self.both_orders = both_orders
        self.reference_column = reference_column
        self.template = template or (SCORE_TEMPLATE if mode == "score" else PAIRWISE_TEMPLATE)
        self.system_prompt = system_prompt
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.temperature, self.max_tokens = temperature, max_tokens
        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        # A local vLLM needs no key, but the client insists on one.
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "not-needed", max_retries=0, timeout=timeout_s
        )
        self.slots = asyncio.Semaphore(concurrency)  # binds to the judge's loop at first use
        self.requests = EventLoopThread(name=f"judge-{model}")
        self.closed = False
        self.cache = ReplyCache(cache_path)
        if mode == "score":
            self.reward_range = (0.0, 1.0) if normalize else (min_score, max_score)
        else:
            self.reward_range = (0.0, 1.0)

    # -- requests -------------------------------------------------------------------------------

    def _messages(self, **fields: str) -> list[dict[str, str]]:
        user = self.template.format(
            rubric=self.rubric, min_score=self.min_score, max_score=self.max_score, **fields
        )
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": user}]

    def _key(self, messages: list[dict[str, str]]) -> str:
        payload = json.dumps([self.model, messages, self.temperature, self.max_tokens], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    async def _request(self, messages: list[dict[str, str]], counters: Counters) -> str:
        """The reply text, retrying transient failures; raises JudgeFailure. Runs on the judge's loop,
        so the counters need no lock."""
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                counters.retries += 1
                await asyncio.sleep(self._delay(attempt, last_error))
            counters.requests += 1
            try:
                async with self.slots:
                    # The raw body: the SDK would hand a non-JSON one back as a str, or raise on bad JSON.
                    sending = self.client.chat.completions.with_raw_response.create(
                        model=self.model, messages=messages, temperature=self.temperature,
                        max_tokens=self.max_tokens,
                    )
                    response = await asyncio.wait_for(sending, self.timeout_s)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                last_error = TimeoutError(f"no complete reply within timeout_s={self.timeout_s:g} s")
                continue
            except (
                self.openai.APIConnectionError, self.openai.RateLimitError, self.openai.InternalServerError
            ) as exc:
                last_error = exc  # APITimeoutError is an APIConnectionError
                continue
            except self.openai.APIStatusError as exc:
                if exc.status_code in RETRY_STATUS:
                    last_error = exc
                    continue
                raise JudgeFailure(f"judge endpoint answered HTTP {exc.status_code}: {exc.message}") from exc
            return reply_content(response.text)
        raise JudgeFailure(
            f"judge request failed after {self.retries + 1} attempts: {last_error}"
        ) from last_error

    def _delay(self, attempt: int, error: Exception | None) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                return min(60.0, float(retry_after))
            except ValueError:
                pass
        # Full jitter keeps many workers that failed together from retrying together.
        return self.backoff_s * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _replies(self, requests: list[list[dict[str, str]]], counters: Counters) -> list[str | JudgeFailure]:
        """Replies for requests (same order), each distinct request sent once, cached ones not at all."""
        if self.closed:
            raise RuntimeError("LLMJudge: called after close()")
        keys = [self._key(messages) for messages in requests]
        replies: dict[str, str | JudgeFailure] = {}
        pending = {}
        for key, messages in zip(keys, requests, strict=True):
            if key in replies or key in pending:
                continue
            cached = self.cache.get(key)
            if cached is not None:
                replies[key] = cached
                counters.cache_hits += 1
            else:
                pending[key] = self.requests.submit(self._request(messages, counters))
        for key, future in pending.items():
            try:
                reply = future.result()
                self.cache.put(key, reply)
                replies[key] = reply
            except JudgeFailure as exc:
                counters.failures += 1
                replies[key] = exc
            except concurrent.futures.CancelledError:
                counters.failures += 1
                replies[key] = JudgeFailure("the judge was closed while the request was in flight")
        return [replies[key] for key in keys]

    def close(self) -> None:
        """Cancel the requests in flight, close the HTTP client and the cache, stop the loop's thread."""
        if self.closed:
            return
        self.closed = True
        self.requests.close(self._shutdown())
        self.cache.close()

    async def _shutdown(self) -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.client.close()

    def _failed(self, reason: str) -> float | None:
        if self.on_failure == "error":
            raise JudgeFailure(reason)
        return None if self.on_failure is None else float(self.on_failure)

    # -- the reward ---------------------------------------------------------------------------------

    def __call__(
        self, completions: list[Any], prompts: list[Any] | None = None, **columns: Any
    ) -> RewardValues:
        if prompts is None or len(prompts) != len(completions):
            raise ValueError("LLMJudge needs `prompts` aligned with `completions`")
        references = columns.get(self.reference_column) if self.reference_column else None
        if self.reference_column and references is None:
            raise KeyError(f"LLMJudge: no column {self.reference_column!r}; the rows have: {sorted(columns)}")
        counters = Counters()
        if self.mode == "score":
            scores = self._score_mode(completions, prompts, references, counters)
        else:
            scores = self._pairwise_mode(completions, prompts, references, counters)
        return RewardValues(scores, counters=vars(counters))

    def _reference_block(self, references: Sequence[Any] | None, index: int) -> str:
        if references is None or references[index] is None:
            return ""
        reference = references[index]
        text = reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)
        return f"\nReference answer:\n{text}\n"

    def _score_mode(
        self, completions: list[Any], prompts: list[Any], references: Sequence[Any] | None, counters: Counters
    ) -> list[float | None]:
        requests = [
            self._messages(
                prompt=prompt_text(prompts[i]),
                completion=completion_text(completions[i]),
                reference_block=self._reference_block(references, i),
            )
            for i in range(len(completions))
        ]
        scores: list[float | None] = []
        for reply in self._replies(requests, counters):
            if isinstance(reply, JudgeFailure):
                scores.append(self._failed(str(reply)))
                continue
            value = parse_score(reply, self.min_score, self.max_score)
            if value is None:
                counters.unparseable += 1
                scale = f"[{self.min_score}, {self.max_score}]"
                scores.append(self._failed(f"judge reply has no score in {scale}: {reply[-200:]!r}"))
                continue
            if self.normalize:
                value = (value - self.min_score) / (self.max_score - self.min_score)
            scores.append(value)
        return scores

    def _pairwise_mode(
        self, completions: list[Any], prompts: list[Any], references: Sequence[Any] | None, counters: Counters
    ) -> list[float | None]:
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(json.dumps(prompt, sort_keys=True, default=str), []).append(index)
        comparisons: list[tuple[int, int]] = []  # (index shown as A, index shown as B)
        for members in groups.values():
            for first, second in itertools.combinations(members, 2):
                comparisons.append((first, second))
                if self.both_orders:
                    comparisons.append((second, first))
        requests = [
            self._messages(
                prompt=prompt_text(prompts[a]),
                response_a=completion_text(completions[a]),
                response_b=completion_text(completions[b]),
                reference_block=self._reference_block(references, a),
            )
            for a, b in comparisons
        ]
        wins = [0.0] * len(completions)
        played = [0] * len(completions)
        for (a, b), reply in zip(comparisons, self._replies(requests, counters), strict=True):
            if isinstance(reply, JudgeFailure):
                continue
            winner = parse_winner(reply)
            if winner is None:
                counters.unparseable += 1
                continue
            played[a] += 1
            played[b] += 1
            wins[a] += {"A": 1.0, "B": 0.0, "tie": 0.5}[winner]
            wins[b] += {"A": 0.0, "B": 1.0, "tie": 0.5}[winner]
        scores: list[float | None] = []
        for index in range(len(completions)):
            group_size = len(groups[json.dumps(prompts[index], sort_keys=True, default=str)])
            if group_size < 2:
                scores.append(None)  # nothing to compare with
            elif played[index] == 0:
                scores.append(self._failed(f"no comparison of completion {index} succeeded"))
            else:
                scores.append(wins[index] / played[index])
        return scores
