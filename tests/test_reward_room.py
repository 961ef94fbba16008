"""The reward room's shared helpers, reachable without a model: the text of prompts and completions,
decoding and scoring sampled groups, the column check over a recipe's splits, and the one door."""

from __future__ import annotations

from pathlib import Path

import pytest

import rewards.base
import rft.reward_loading
from rft.config import DataConfig, RewardConfig, ScoringConfig
from rft.data import Example
from rft.reward_context import completion_text, conversation_text, prompt_text
from rft.scoring import RewardError, RewardScorer, score_groups
from rft.trajectories import Trajectories, decode_completions

HERE = Path(__file__).resolve()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    {"role": "assistant", "content": "Hello"},
]


def letters(completions, **kwargs):
    return [float(len(completion_text(c))) for c in completions]


class CharacterTokenizer:
    """Token ids are character codes; 0 is a special token that decoding skips."""

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        assert skip_special_tokens
        return ["".join(chr(i) for i in row if i) for row in ids]


def _scorer() -> RewardScorer:
    return RewardScorer([RewardConfig(fn=f"{HERE}:letters")], ScoringConfig(isolation="thread"))


def test_the_three_texts_of_a_conversation():
    assert completion_text(CHAT) == "Hello"  # the assistant's content only
    assert prompt_text(CHAT) == "Be brief.\nHi\nHello"  # every message's text
    mixed = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert conversation_text(mixed) == "assistant: a\nuser: b"
    assert conversation_text("plain") == completion_text("plain") == prompt_text("plain") == "plain"
    # Plugins keep finding them in rewards.base: the same functions, not copies.
    assert rewards.base.completion_text is completion_text and rewards.base.prompt_text is prompt_text


def test_decoding_gives_chat_completions_after_a_chat_prompt():
    examples = [Example(prompt="2+2?", prompt_ids=[1]),
                Example(prompt=[{"role": "user", "content": "x"}], prompt_ids=[2])]
    ids = [[52], [53, 0], [65], [66]]
    assert decode_completions(CharacterTokenizer(), examples, ids, 2) == [
        "4", "5", [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]
    ]


def test_score_groups_expands_decodes_and_scores():
    examples = [Example(prompt="a", prompt_ids=[1], row={"id": 1}),
                Example(prompt="b", prompt_ids=[2], row={"id": 2})]
    ids = [[97], [97, 98], [97, 98, 99], [0]]
    scorer = _scorer()
    try:
        for per_group in (True, False):
            scored = score_groups(scorer, examples, _sampled(examples, ids), 2, call_per_group=per_group)
            assert scored.rows == [examples[0], examples[0], examples[1], examples[1]]
            assert scored.completions == ["a", "ab", "abc", ""]
            assert scored.scores.total == [1.0, 2.0, 3.0, 0.0]
    finally:
        scorer.close()


def _sampled(examples: list[Example], ids: list[list[int]], **fields) -> Trajectories:
    return Trajectories(
        prompt_ids=[e.prompt_ids for e in examples for _ in range(2)], completion_ids=ids, masks=None,
        logprobs=None, truncated=[False] * len(ids),
        completions=decode_completions(CharacterTokenizer(), examples, ids, 2), **fields,
    )


def test_an_environments_rewards_add_to_the_recipes_and_are_listed_as_environment():
    examples = [Example(prompt="a", prompt_ids=[1], row={"id": 1}),
                Example(prompt="b", prompt_ids=[2], row={"id": 2})]
    ids = [[97], [97, 98], [97, 98, 99], [0]]
    scorer = _scorer()
    try:
        sampled = _sampled(examples, ids, environment_rewards=[0.5, 0.0, -1.0, 0.25])
        scored = score_groups(scorer, examples, sampled, 2)
    finally:
        scorer.close()
    assert scored.scores.total == [1.5, 2.0, 2.0, 0.25]
    assert scored.scores.per_function["environment"] == [0.5, 0.0, -1.0, 0.25]
    assert scored.scores.metrics["reward/environment/mean"] == pytest.approx(-0.25 / 4)


def test_check_splits_names_each_source():
    scorer = RewardScorer([RewardConfig(fn="rewards.text:exact_match")], ScoringConfig(isolation="thread"))
    with_answer = [Example(prompt="q", prompt_ids=[], row={"reference_answer": "1"})]
    without = [Example(prompt="q", prompt_ids=[], row={"question": "q"})]
    data = DataConfig(train="train.jsonl", eval="eval.jsonl")
    scorer.check_splits(data, with_answer, with_answer)
    with pytest.raises(RewardError, match=r"is in no row of the held-out rows \(eval.jsonl\)") as error:
        scorer.check_splits(data, with_answer, without)
    assert "data.train" not in str(error.value)


def test_the_door_hands_rft_what_it_needs_from_the_plugins():
    assert rft.reward_loading.RewardValues is rewards.base.RewardValues
    assert rft.reward_loading.PIIDetector.__module__ == "rewards.pii"
    name, function = rft.reward_loading.build_reward("rewards.text:exact_match")
    assert name == "exact_match" and callable(function)
