"""The rubric combinator: a weighted sum of components, each reported separately."""

from __future__ import annotations

import json

import pytest

from rewards.rubric import Rubric
from rft.config import RewardConfig
from rft.scoring import RewardError, RewardScorer

SCHEMA = {"type": "object", "required": ["answer", "source"],
          "properties": {"answer": {"type": "string"}, "source": {"type": "string"}}}
COMPONENTS = [
    {"name": "grounded", "fn": "rewards.grounding:cited_sources", "kwargs": {"penalty": 0}},
    {"name": "schema", "fn": "rewards.structured:JsonSchemaReward", "kwargs": {"schema": SCHEMA}},
    {"name": "concise", "fn": "rewards.text:length_band", "kwargs": {"max": 12}},
    {"name": "violation", "fn": "rewards.policy:blocked_terms", "kwargs": {"terms": ["guarantee"]}},
]
PASSAGES = [{"id": "doc-1"}]


def test_weighted_sum_and_components():
    rubric = Rubric(COMPONENTS)
    good = json.dumps({"answer": "Refunds take 5 days.", "source": "[doc-1]"})
    bad = json.dumps({"answer": "We guarantee refunds in 5 days, always, for everyone, no questions asked.",
                      "source": "[doc-1]", "extra": 1})
    values = rubric([good, bad], passages=[PASSAGES, PASSAGES])
    assert values.components["grounded"] == [1.0, 1.0]
    assert values.components["schema"] == [1.0, 0.0]
    assert values.components["concise"] == [1.0, 0.0]
    assert values.components["violation"] == [0.0, -1.0]
    assert values == [3.0, 0.0]
    assert values.components["grounded.invalid"] == [0.0, 0.0]  # components' own parts, namespaced
    assert values.counters["schema.schema_errors"] == 1


def test_rubric_in_the_scorer_logs_each_component():
    scorer = RewardScorer([
        RewardConfig(fn="rewards.rubric:Rubric", name="support", kwargs={"components": COMPONENTS})
    ])
    good = json.dumps({"answer": "ok", "source": "[doc-1]"})
    output = scorer.score(["q"], [good], [[]], [{"passages": PASSAGES}])
    assert output.total == [3.0]
    assert output.metrics["reward/support/schema/mean"] == 1.0
    assert output.metrics["reward/support/violation/mean"] == 0.0


def test_range_normalisation_and_errors():
    rubric = Rubric([{"fn": "rewards.text:length_band", "kwargs": {"max": 3}, "weight": 2},
                     {"fn": "rewards.maths:gsm8k_format", "weight": -1}])
    assert rubric.reward_range == (-1.0, 2.0)
    normalised = Rubric([{"fn": "rewards.text:length_band", "kwargs": {"max": 3}, "weight": 2},
                         {"fn": "rewards.maths:gsm8k_format", "weight": 2}], normalize=True)
    assert normalised(["#### 4"]) == [1.0]
    assert Rubric([{"fn": "rewards.policy:blocked_terms", "kwargs": {"terms": ["x"]}}]).reward_range is None
    with pytest.raises(ValueError, match="unknown"):
        Rubric([{"fn": "rewards.text:length_band", "wieght": 1}])
    with pytest.raises(ValueError, match="unique"):
        Rubric([{"fn": "rewards.maths:gsm8k_format"}, {"fn": "rewards.maths:gsm8k_format"}])
    with pytest.raises(RewardError, match="unknown kwargs"):
        Rubric([{"fn": "rewards.text:length_band", "kwargs": {"maximum": 3}}])
