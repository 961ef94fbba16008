"""Bedrock reward Lambda handlers run locally, unmodified: event shape, both result shapes, id
matching, metrics, and errors that name the handler and the id."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rewards.bedrock_lambda import BedrockLambdaReward, LambdaHandlerError
from rft.config import RewardConfig, ScoringConfig
from rft.scoring import RewardError, RewardScorer

EXAMPLE = Path(__file__).resolve().parents[1] / "rewards" / "examples" / "gsm8k_reward_lambda.py"

ROWS = [
    {"messages": [{"role": "system", "content": "Solve."}, {"role": "user", "content": "What is 7 + 5?"}],
     "reference_answer": {"final_answer": "12"}, "domain": "arithmetic", "difficulty_level": "easy"},
    {"messages": [{"role": "user", "content": "What is 2 * 21?"}],
     "reference_answer": "42", "domain": "arithmetic", "difficulty_level": "easy"},
]


def handler_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "handler.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:lambda_handler"


def score(scorer: RewardScorer, completions: list[str], rows=ROWS):
    prompts = [row["messages"] for row in rows]
    return scorer.score(prompts, completions, [[]] * len(rows), rows)


def test_example_handler_scores_and_logs_metrics_list():
    scorer = RewardScorer([
        RewardConfig(fn="rewards.bedrock_lambda:BedrockLambdaReward", kwargs={"handler": str(EXAMPLE)})
    ])
    completions = ["7 + 5 = 12\n#### 12", "2 * 21 = 40\n#### 40"]
    output = score(scorer, completions)
    name = "gsm8k_reward_lambda"
    assert output.per_function[name] == [1.0, 0.0]
    assert output.components[f"{name}/correct"] == [1.0, 0.0]
    assert output.metrics[f"reward/{name}/uses_final_marker/mean"] == 1.0
    assert output.metrics[f"reward/{name}/response_chars/mean"] == sum(map(len, completions)) / 2


def test_event_shape_context_and_status_code_body_results(tmp_path):
    spec = handler_file(tmp_path, """
        import json
        EVENTS = []
        def lambda_handler(event, context):
            EVENTS.append((event, context.function_name, context.get_remaining_time_in_millis()))
            # Answer in reverse order, wrapped the way an API Gateway-style Lambda would.
            results = [{"id": item["id"], "aggregate_reward_score": len(item["messages"][-1]["content"])}
                       for item in reversed(event)]
            return {"statusCode": 200, "body": json.dumps(results)}
    """)
    reward = BedrockLambdaReward(handler=spec, function_name="support-reward")
    values = reward(["abc", "abcdef"], prompts=[row["messages"] for row in ROWS],
                    **{key: [row[key] for row in ROWS] for key in ROWS[0]})
    assert values == [3.0, 6.0]  # matched by id, not by position
    event, function_name, remaining_ms = reward.handler.__globals__["EVENTS"][0]
    assert function_name == "support-reward" and 0 < remaining_ms <= 900_000
    first = event[0]
    assert set(first) == {"id", "messages", "reference_answer", "metadata"}
    assert first["messages"] == [*ROWS[0]["messages"], {"role": "assistant", "content": "abc"}]
    assert first["reference_answer"] == {"final_answer": "12"}
    assert first["metadata"] == {"reference_answer": {"final_answer": "12"}, "domain": "arithmetic",
                                 "difficulty_level": "easy"}
    assert event[1]["messages"][0] == {"role": "user", "content": "What is 2 * 21?"}
    assert len({item["id"] for item in event}) == 2


def test_text_prompts_and_reward_components_dict(tmp_path):
    spec = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return [{"id": item["id"], "aggregate_reward_score": 0.5,
                     "reward_components": {"correctness": 0.5}} for item in event]
    """)
    values = BedrockLambdaReward(handler=spec)(["x"], prompts=["plain text prompt"])
    assert values == [0.5] and values.components == {"correctness": [0.5]}


def test_batch_size_splits_invocations(tmp_path):
    spec = handler_file(tmp_path, """
        SIZES = []
        def lambda_handler(event, context):
            SIZES.append(len(event))
            return [{"id": item["id"], "aggregate_reward_score": 1} for item in event]
    """)
    reward = BedrockLambdaReward(handler=spec, batch_size=2)
    assert reward(["a", "b", "c", "d", "e"], prompts=["p"] * 5) == [1.0] * 5
    assert reward.handler.__globals__["SIZES"] == [2, 2, 1]


def test_handler_that_raises_is_named(tmp_path):
    spec = handler_file(tmp_path, """
        def lambda_handler(event, context):
            raise KeyError("reference_answer")
    """)
    scorer = RewardScorer([
        RewardConfig(fn="rewards.bedrock_lambda:BedrockLambdaReward", kwargs={"handler": spec})
    ])
    with pytest.raises(
        RewardError, match=r"Bedrock Lambda handler .*handler\.py:lambda_handler raised KeyError"
    ):
        score(scorer, ["a", "b"])
    tolerant = RewardScorer([
        RewardConfig(fn="rewards.bedrock_lambda:BedrockLambdaReward", kwargs={"handler": spec})
    ],
                            ScoringConfig(on_error="zero"))
    output = score(tolerant, ["a", "b"])
    assert output.per_function["handler"] == [0.0, 0.0] and output.metrics["reward/handler/errors"] == 1.0


def test_wrong_ids_stop_the_run_whatever_the_policy(tmp_path):
    spec = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return [{"id": "0", "aggregate_reward_score": 0.0} for item in event]
    """)
    scorer = RewardScorer([
        RewardConfig(fn="rewards.bedrock_lambda:BedrockLambdaReward", kwargs={"handler": spec})
    ],
                          ScoringConfig(on_error="zero"))
    with pytest.raises(
        RewardError, match=r"handler\.py:lambda_handler returned id '0', which was not in the event"
    ):
        score(scorer, ["a", "b"])
    missing = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return [{"id": event[0]["id"], "aggregate_reward_score": 1.0}]
    """)
    with pytest.raises(RewardError, match=r"returned no result for id\(s\) \['rollout-1-1'\]"):
        RewardScorer([
            RewardConfig(fn="rewards.bedrock_lambda:BedrockLambdaReward", kwargs={"handler": missing})
        ]).score(
            ["p", "p"], ["a", "b"], [[], []], [{}, {}])


def test_non_numbers_name_the_id(tmp_path):
    spec = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return [{"id": item["id"], "aggregate_reward_score": "high" if i else 1.0,
                     "metrics_list": [{"name": "m", "value": 1, "type": "Metric"}]}\
 for i, item in enumerate(event)]
    """)
    with pytest.raises(
        LambdaHandlerError, match=r"returned aggregate_reward_score 'high' for id 'rollout-1-1'"
    ):
        BedrockLambdaReward(handler=spec)(["a", "b"], prompts=["p", "p"])
    nan = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return [{"id": item["id"], "aggregate_reward_score": float("nan")} for item in event]
    """)
    with pytest.raises(LambdaHandlerError, match="expected a finite number"):
        BedrockLambdaReward(handler=nan)(["a"], prompts=["p"])


def test_error_status_code(tmp_path):
    spec = handler_file(tmp_path, """
        def lambda_handler(event, context):
            return {"statusCode": 500, "body": "model table missing"}
    """)
    with pytest.raises(LambdaHandlerError, match="returned statusCode 500: 'model table missing'"):
        BedrockLambdaReward(handler=spec)(["a"], prompts=["p"])
