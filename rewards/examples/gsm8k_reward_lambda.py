"""An Amazon Bedrock RFT reward Lambda for GSM8K, written as one would deploy it to AWS Lambda.

It uses only the standard library and the event and result shapes of Bedrock reinforcement
fine-tuning, so the same file can be uploaded unchanged. rft runs it locally through
`rewards.bedrock_lambda:BedrockLambdaReward` (see recipes and tests/test_lambda.py).
"""

import json
import re

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def extract_answer(text):
    """The number after the last '####', else the last number in the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def ground_truth(item):
    reference = item.get("metadata", {}).get("reference_answer", item.get("reference_answer"))
    if isinstance(reference, dict):
        reference = reference.get("final_answer", reference.get("answer"))
    if reference is None:
        return None
    return extract_answer(str(reference))


def lambda_handler(event, context):
    results = []
    for item in event:
        response = ""
        for message in item.get("messages", []):
            if message.get("role") == "assistant":
                response = message.get("content", "")
        expected = ground_truth(item)
        predicted = extract_answer(response)
        correct = expected is not None and predicted is not None and float(predicted) == float(expected)
        formatted = bool(re.search(r"####\s*-?\d", response))
        results.append(
            {
                "id": item["id"],
                "aggregate_reward_score": 1.0 if correct else 0.0,
                "metrics_list": [
                    {"name": "correct", "value": float(correct), "type": "Reward"},
                    {"name": "uses_final_marker", "value": float(formatted), "type": "Metric"},
                    {"name": "response_chars", "value": float(len(response)), "type": "Metric"},
                ],
            }
        )
    print(json.dumps({"scored": len(results), "request_id": getattr(context, "aws_request_id", None)}))
    return results
