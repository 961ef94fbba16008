"""Agent episodes with scripted model turns: token-in / token-out ids, the mask, limits, tools, failures.

The engine is scripted (each turn's text is fixed) so that every id of a trajectory can be checked;
the tokenizer and chat template are the embedded SmolLM2's. Real engines run episodes in
`tests/test_agent_engines.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rft.agents.chat import ChatFormat
from rft.agents.episodes import Episodes
from rft.agents.tools import ToolRunner
from rft.data import Example
from rft.reward_loading import load_function
from rft.rollout.base import RolloutOutput
from rft.sampling import SamplingSettings

ENVS = Path(__file__).parent / "agent_envs.py"
SAMPLING = SamplingSettings(max_new_tokens=64)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    from rft.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


class ScriptedTurns:
    """Answers turn t (counted from the assistant headers in the context) with `script(t, context)`,
    ended by the end-of-sequence token; log-prob -(t + 1) / 10 for every token of turn t."""

    name = "scripted"

    def __init__(self, tokenizer, script: Callable[[int, str], str], *, end: bool = True):
        self.tokenizer, self.script, self.end = tokenizer, script, end
        self.contexts: list[list[int]] = []

    def generate(self, prompt_ids, n: int, sampling: SamplingSettings) -> RolloutOutput:
        completions, logprobs, truncated = [], [], []
        for context in prompt_ids:
            self.contexts.append(list(context))
            text = self.tokenizer.decode(context)
            turn = text.count("<|im_start|>assistant") - 1
            for _ in range(n):
                ids = self.tokenizer.encode(self.script(turn, text), add_special_tokens=False)
                ids = [*ids, self.tokenizer.eos_token_id] if self.end else ids
                completions.append(ids[: sampling.max_new_tokens])
                logprobs.append([-(turn + 1) / 10] * len(completions[-1]))
                truncated.append(not self.end or len(ids) > sampling.max_new_tokens)
        return RolloutOutput(completions, logprobs, truncated)


def _episodes(tokenizer, environment: str, *, tools: dict[str, str] | None = None, max_turns: int = 4,
              max_tokens: int = 512, schemas: list | None = None, timeout_s: float = 5) -> Episodes:
    runner = ToolRunner(tools, timeout_s=5, memory_mb=None, concurrency=2) if tools else None
    chat = ChatFormat(tokenizer, {}, schemas or [])
    factory = load_function(f"{ENVS}:{environment}")
    return Episodes(tokenizer, chat, factory, runner, max_turns=max_turns, max_tokens=max_tokens,
                    timeout_s=timeout_s)


def _example(question: str = "What is 2 + 3?", answer: str = "5") -> Example:
    prompt = [{"role": "user", "content": question}]
    return Example(prompt=prompt, prompt_ids=[], row={"answer": answer}, source="test.jsonl:1")


def test_a_two_turn_trajectory_is_exactly_the_sampled_ids_and_the_environments(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: ["4", "5"][turn])
    episodes = _episodes(tokenizer, "RetryOnce")
    sampled = episodes.sample(engine, [_example()], 1, SAMPLING)

    first, second = engine.contexts  # the engine saw the prompt, then the whole trajectory so far
    turn_1 = [*tokenizer.encode("4", add_special_tokens=False), tokenizer.eos_token_id]
    turn_2 = [*tokenizer.encode("5", add_special_tokens=False), tokenizer.eos_token_id]
    assert sampled.prompt_ids[0] == first
    environment = second[len(first) + len(turn_1):]
    assert second == first + turn_1 + environment  # nothing before was re-tokenized
    assert tokenizer.decode(environment) == (
        "\n<|im_start|>user\nWrong, try again.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert sampled.completion_ids[0] == turn_1 + environment + turn_2
    assert sampled.masks[0] == [1] * len(turn_1) + [0] * len(environment) + [1] * len(turn_2)
    assert sampled.logprobs[0] == [-0.1] * len(turn_1) + [0.0] * len(environment) + [-0.2] * len(turn_2)
    # The chat template renders the same conversation to the same ids (it adds only the last "\n").
    conversation = [*_example().prompt, *[m for m in sampled.completions[0]]]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) == first + sampled.completion_ids[0] + (
        tokenizer.encode("\n", add_special_tokens=False))
    assert [m["role"] for m in sampled.completions[0]] == ["assistant", "user", "assistant"]
    assert sampled.environment_rewards == [0.5] and sampled.truncated == [False]


def test_a_group_shares_its_prompt_and_each_episode_its_own_environment(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    examples = [_example(), _example("1 + 1?", "2")]
    sampled = _episodes(tokenizer, "RetryOnce").sample(engine, examples, 3, SAMPLING)
    assert len(sampled) == 6 and sampled.prompt_ids[0] == sampled.prompt_ids[2] != sampled.prompt_ids[3]
    assert sampled.environment_rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # Right at once: the model's tokens only; wrong twice: the environment's turn in between.
    assert [0 in mask for mask in sampled.masks] == [False] * 3 + [True] * 3


def test_max_turns_ends_an_episode_that_the_environment_does_not(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: f"turn {turn}")
    sampled = _episodes(tokenizer, "NeverDone", max_turns=3).sample(engine, [_example()], 2, SAMPLING)
    assert [m["content"] for m in sampled.completions[0] if m["role"] == "assistant"] == [
        "turn 0", "turn 1", "turn 2"
    ]
    assert sampled.environment_rewards == [0.75, 0.75] and sampled.truncated == [False, False]
    assert sampled.sums[next(m for m in sampled.sums if m.name == "agent/turns")] == (6, 2)


def test_the_token_budget_truncates_mid_turn_and_before_an_environment_turn(tokenizer) -> None:
    long_answer = " ".join(["word"] * 40)
    engine = ScriptedTurns(tokenizer, lambda turn, _: long_answer)
    sampled = _episodes(tokenizer, "NeverDone", max_tokens=20).sample(engine, [_example()], 1, SAMPLING)
    assert len(sampled.completion_ids[0]) == 20 and sampled.truncated == [True]
    assert sampled.masks[0] == [1] * 20

    engine = ScriptedTurns(tokenizer, lambda turn, _: "short")
    sampled = _episodes(tokenizer, "NeverDone", max_tokens=8).sample(engine, [_example()], 1, SAMPLING)
    # The answer fits, the environment's turn does not: the episode stops, truncated, the model's ids only.
    assert sampled.truncated == [True] and sampled.masks[0] == [1] * len(sampled.completion_ids[0])


def test_tool_calls_are_run_and_answered_with_their_results(tokenizer) -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    engine = ScriptedTurns(tokenizer, lambda turn, _: [call, "5"][turn])
    episodes = _episodes(tokenizer, "Calculator", tools={"add": f"{ENVS}:add"})
    try:
        sampled = episodes.sample(engine, [_example()], 2, SAMPLING)
    finally:
        episodes.close()
    conversation = sampled.completions[0]
    assert [m["role"] for m in conversation] == ["assistant", "tool", "assistant"]
    assert conversation[0]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    ]
    assert conversation[1]["content"] == "5" and sampled.environment_rewards == [1.0, 1.0]
    ids, mask = sampled.completion_ids[0], sampled.masks[0]
    environment = [token for token, kept in zip(ids, mask, strict=True) if not kept]
    assert tokenizer.decode(environment) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"


def test_malformed_and_failing_tool_calls_are_answered_with_errors_never_raised(tokenizer) -> None:
    calls = ['<tool_call>\n{"name": "add", "arguments": {"a": 2,\n</tool_call>',
             '<tool_call>\n{"name": "explode", "arguments": {"text": "x"}}\n</tool_call>', "done"]
    engine = ScriptedTurns(tokenizer, lambda turn, _: calls[turn])
    episodes = _episodes(tokenizer, "Calculator", tools={"add": f"{ENVS}:add", "explode": f"{ENVS}:explode"})
    try:
        sampled = episodes.sample(engine, [_example()], 1, SAMPLING)
    finally:
        episodes.close()
    tool_messages = [m["content"] for m in sampled.completions[0] if m["role"] == "tool"]
    assert len(tool_messages) == 2 and all("error" in text.lower() for text in tool_messages)
    assert "tool failed on 'x'" in tool_messages[1]
    failures = next(m for m in sampled.sums if m.name == "agent/tool_failure_share")
    assert sampled.sums[failures] == (2, 2)


def test_an_environment_that_raises_ends_its_episode_with_no_reward(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    sampled = _episodes(tokenizer, "Raises").sample(engine, [_example()], 2, SAMPLING)
    assert sampled.environment_rewards == [0.0, 0.0]
    failures = next(m for m in sampled.sums if m.name == "agent/environment_failure_share")
    assert sampled.sums[failures] == (2, 2)


def test_an_environment_that_hangs_is_left_behind_after_its_time(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    episodes = _episodes(tokenizer, "Hangs", timeout_s=1)
    start = time.perf_counter()
    sampled = episodes.sample(engine, [_example()], 2, SAMPLING)
    episodes.close()
    # The step sleeps 30 s; the rollout goes on after its 1 s limit (with room for a loaded machine).
    assert time.perf_counter() - start < 10
    assert sampled.environment_rewards == [0.0, 0.0]
    failures = next(m for m in sampled.sums if m.name == "agent/environment_failure_share")
    assert sampled.sums[failures] == (2, 2)


def test_an_environment_answering_with_no_messages_ends_its_episode(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    sampled = _episodes(tokenizer, "BadMessages").sample(engine, [_example()], 1, SAMPLING)
    assert sampled.environment_rewards == [0.0] and len(sampled.completions[0]) == 1
    failures = next(m for m in sampled.sums if m.name == "agent/environment_failure_share")
    assert sampled.sums[failures] == (1, 1)


def test_an_environment_that_cannot_open_names_the_row(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: the environment could not open .*KeyError"):
        _episodes(tokenizer, "CannotOpen").sample(engine, [_example()], 2, SAMPLING)


def test_async_environments_are_awaited(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: ["4", "5"][turn])
    sampled = _episodes(tokenizer, "AsyncRetryOnce").sample(engine, [_example()], 1, SAMPLING)
    assert sampled.environment_rewards == [0.5 + 0.125]


def test_environments_of_one_group_must_open_alike(tokenizer) -> None:
    engine = ScriptedTurns(tokenizer, lambda turn, _: "5")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: the environments built from this row open"):
        _episodes(tokenizer, "RandomStart").sample(engine, [_example()], 2, SAMPLING)
