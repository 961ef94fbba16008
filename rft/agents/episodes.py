"""Agent episodes: n trajectories per example, turn by turn, token-in / token-out.

Each turn, every live trajectory of the call is sampled in one `engine.generate` (vLLM batches them
all; transformers pads them into its batches). A trajectory's ids grow by exactly the ids the
engine returned (mask 1, with their log-probs) and by the ids of what the environment added
(`ChatFormat.turn_ids`, mask 0): nothing is re-tokenized, so the update scores the sampled tokens.

A turn whose text holds tool calls is answered by the tools (`ToolRunner`, each call in a bounded
worker); any other turn by the environment's `step`. An episode ends when a step says done, after
`max_turns` model turns, or when the token budget runs out (the trajectory is then truncated: cut
mid-turn, or with no room left for the environment's answer and a next turn).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rft.agents.chat import ChatFormat
from rft.agents.tools import ParsedTurn, ToolRunner, parse_tool_calls
from rft.data import Example
from rft.environment import Environment, Message, Step
from rft.metrics import (
    AGENT_ENVIRONMENT_FAILURES,
    AGENT_ENVIRONMENT_TOKENS,
    AGENT_TOOL_CALLS,
    AGENT_TOOL_FAILURES,
    AGENT_TURNS,
    Metric,
)
from rft.rollout.base import RolloutEngine
from rft.sampling import SamplingSettings
from rft.trajectories import Trajectories

logger = logging.getLogger(__name__)

EnvironmentFactory = Callable[[dict[str, Any]], Environment]
# Sync environments' calls run side by side in this many threads.
ENVIRONMENT_THREADS = 8


@dataclass
class Episode:
    """One trajectory being played."""

    environment: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)  # the conversation after the prompt
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    failed: bool = False  # the environment raised or timed out: its reward is 0
    calls: ParsedTurn | None = None  # the last turn's tool calls, when it made any (well-formed or not)
    truncated: bool = False
    done: bool = False

    def add_model_turn(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.turns += 1

    def add_environment_turn(self, ids: Sequence[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)


async def _bounded(value: Any, timeout_s: float) -> Any:
    """`value` awaited if it is awaitable, within `timeout_s`."""
    if inspect.isawaitable(value):
        return await asyncio.wait_for(value, timeout_s)
    return value


async def _call(
    function: Callable[..., Any], argument: Any, timeout_s: float, threads: ThreadPoolExecutor
) -> Any:
    """An environment method, sync or async, bounded in time. A sync one runs in `threads`, so a slow
    environment does not hold up the others. A thread cannot be stopped: one past its time is left
    behind, its result ignored; the pool is the episodes' own, never joined, so it cannot hold up the
    trainer either (asyncio's default pool is joined at the end of every `asyncio.run`)."""
    if inspect.iscoroutinefunction(function):
        return await asyncio.wait_for(function(argument), timeout_s)
    running = asyncio.get_running_loop().run_in_executor(threads, function, argument)
    return await _bounded(await asyncio.wait_for(running, timeout_s), timeout_s)


class Episodes:
    """Plays n episodes per example with an engine, an environment per episode and the tools."""

    def __init__(
        self, tokenizer: Any, chat: ChatFormat, make_environment: EnvironmentFactory,
        tools: ToolRunner | None, *, max_turns: int, max_tokens: int, timeout_s: float,
    ):
        self.tokenizer, self.chat, self.make_environment = tokenizer, chat, make_environment
        self.tools = tools
        self.max_turns, self.max_tokens, self.timeout_s = max_turns, max_tokens, timeout_s
        self.threads = ThreadPoolExecutor(ENVIRONMENT_THREADS, thread_name_prefix="rft-environment")
        self._engine_logprobs = True  # every turn of the current call came with the sampler's log-probs

    def sample(
        self, engine: RolloutEngine, examples: Sequence[Example], n: int, sampling: SamplingSettings
    ) -> Trajectories:
        self._engine_logprobs = True
        episodes = [self._start(example, n) for example in examples]
        flat = [episode for group in episodes for episode in group]
        for turn in range(self.max_turns):
            live = [e for e in flat if not e.done]
            if not live:
                break
            # Each turn its own seeds (when the call has any): the first turn's must not repeat.
            turn_sampling = sampling.seeded(sampling.seed, turn) if sampling.seed is not None else sampling
            self._model_turn(engine, live, turn_sampling)
            asyncio.run(self._environment_turns([e for e in live if not e.done]))
        for episode in flat:
            episode.done = True
        asyncio.run(self._final_rewards(flat))
        return self._trajectories(flat)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self.tools is not None:
            self.tools.close()

    def _start(self, example: Example, n: int) -> list[Episode]:
        """The example's n episodes; their environments must open alike (one prompt per group)."""
        row = {**example.row, "prompt": example.prompt}
        try:
            environments = [self.make_environment(row) for _ in range(n)]
            first = [environment.reset() for environment in environments]
        except Exception as exc:  # no prompt to play: the row, not one episode, is broken; say which
            raise ValueError(f"{example.source}: the environment could not open an episode for this row: "
                             f"{type(exc).__name__}: {exc}") from exc
        if any(messages != first[0] for messages in first[1:]):
            raise ValueError(
                f"{example.source}: the environments built from this row open with different messages; "
                "a group's trajectories must answer one prompt"
            )
        prompt_ids = self.chat.prompt_ids(first[0])
        return [Episode(environment, list(prompt_ids)) for environment in environments]

    def _model_turn(self, engine: RolloutEngine, live: list[Episode], sampling: SamplingSettings) -> None:
        """One turn of every live episode, in one engine call; a turn past the budget is cut there."""
        output = engine.generate([e.prompt_ids + e.ids for e in live], 1, sampling)
        self._engine_logprobs = self._engine_logprobs and output.logprobs is not None
        sampled = output.completion_ids
        kept = [ids[: self.max_tokens - len(e.ids)] for e, ids in zip(live, sampled, strict=True)]
        texts = self.tokenizer.batch_decode(kept, skip_special_tokens=True)
        for i, episode in enumerate(live):
            logprobs = output.logprobs[i][: len(kept[i])] if output.logprobs is not None else None
            episode.add_model_turn(kept[i], logprobs)
            episode.messages.append(self._assistant_message(episode, texts[i]))
            if len(kept[i]) < len(sampled[i]) or output.truncated[i]:
                episode.truncated = episode.done = True

    def _assistant_message(self, episode: Episode, text: str) -> Message:
        """The turn as a message; its tool calls, parsed once, kept on the episode for `_answer`."""
        message: Message = {"role": "assistant", "content": text}
        parsed = parse_tool_calls(text) if self.tools is not None else None
        episode.calls = parsed if parsed is not None and (parsed.calls or parsed.errors) else None
        if episode.calls is not None:
            message["tool_calls"] = [call.as_message_call() for call in episode.calls.calls]
        return message

    async def _environment_turns(self, live: list[Episode]) -> None:
        steps = await asyncio.gather(*(self._answer(e) for e in live))
        for episode, step in zip(live, steps, strict=True):
            episode.messages += step.messages
            episode.reward += step.reward or 0.0
            if step.done or episode.turns >= self.max_turns:
                episode.done = True
                continue
            ids = self.chat.turn_ids(step.messages)
            if len(episode.ids) + len(ids) >= self.max_tokens:
                episode.truncated = episode.done = True  # no room for the answer and a next turn
                continue
            episode.add_environment_turn(ids)

    async def _answer(self, episode: Episode) -> Step:
        """The tools' answer to a turn with tool calls, else the environment's; a failure ends the episode."""
        message, parsed = episode.messages[-1], episode.calls
        if parsed is not None and self.tools is not None:
            # The runner bounds every call itself (its workers are killed past their time).
            results = await self.tools.arun(parsed.calls)
            episode.tool_calls += len(parsed.calls) + len(parsed.errors)
            episode.tool_failures += len(parsed.errors) + sum(r.failed for r in results)
            errors = [{"role": "tool", "content": f"error: {error}"} for error in parsed.errors]
            return Step(messages=[r.message for r in results] + errors)
        try:
            step = await _call(episode.environment.step, message, self.timeout_s, self.threads)
        except Exception as exc:  # the environment's failure is the episode's, never the run's
            return self._failed(episode, "step", exc)
        if not isinstance(step, Step):
            return self._failed(episode, "step", TypeError(f"returned {type(step).__name__}, not a Step"))
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in step.messages):
            return self._failed(episode, "step", TypeError("Step.messages must be a list of message dicts"))
        return step

    def _failed(self, episode: Episode, method: str, error: BaseException) -> Step:
        logger.warning("environment %s: %s", method, f"{type(error).__name__}: {error}"[:300])
        episode.failed = True
        return Step(done=True)

    async def _final_rewards(self, episodes: list[Episode]) -> None:
        async def final(episode: Episode) -> None:
            if episode.failed:
                episode.reward = 0.0
                return
            try:
                value = await _call(
                    episode.environment.reward, list(episode.messages), self.timeout_s, self.threads
                )
            except Exception as exc:  # as in `_answer`
                self._failed(episode, "reward", exc)
                episode.reward = 0.0
                return
            episode.reward += float(value) if value is not None else 0.0

        await asyncio.gather(*(final(e) for e in episodes))

    def _trajectories(self, episodes: list[Episode]) -> Trajectories:
        count = len(episodes)
        calls = sum(e.tool_calls for e in episodes)
        sums: dict[Metric, tuple[float, float]] = {
            AGENT_TURNS: (sum(e.turns for e in episodes), count),
            AGENT_TOOL_CALLS: (calls, count),
            AGENT_TOOL_FAILURES: (sum(e.tool_failures for e in episodes), calls),
            AGENT_ENVIRONMENT_FAILURES: (sum(e.failed for e in episodes), count),
            AGENT_ENVIRONMENT_TOKENS: (sum(len(e.ids) - sum(e.mask) for e in episodes), count),
        }
        return Trajectories(
            prompt_ids=[e.prompt_ids for e in episodes],
            completion_ids=[e.ids for e in episodes],
            masks=[e.mask for e in episodes],
            logprobs=[e.logprobs for e in episodes] if self._engine_logprobs else None,
            truncated=[e.truncated for e in episodes],
            completions=[e.messages for e in episodes],
            environment_rewards=[e.reward for e in episodes],
            sums=sums,
        )
