"""Run an unmodified Amazon Bedrock RFT reward Lambda handler locally, as a reward.

Recipe::

    rewards:
      - fn: rewards.bedrock_lambda:BedrockLambdaReward
        kwargs:
          handler: lambdas/gsm8k_reward.py:lambda_handler   # the file you would deploy
          # batch_size: 32          # rollouts per invocation (default: the whole call)
          # function_name: gsm8k-reward
          # timeout_s: 900          # what context.get_remaining_time_in_millis() counts down from

Each call builds the event Bedrock sends (DESIGN.md section 4): a list with one entry per
completion, `{"id", "messages": [...prompt messages, {"role": "assistant", "content": completion}],
"reference_answer", "metadata": {"reference_answer", ...the row's other fields}}`. The
`reference_answer` sits both at the top level and in `metadata`, because AWS's own samples read
either. The event goes through JSON on its way in and the result on its way out, as they would
over the wire, so a handler that works here receives and returns what it would on Lambda.

The handler may return the list of results or `{"statusCode": 200, "body": "<that list as JSON>"}`.
Results are matched to completions by `id`, in any order. `aggregate_reward_score` is the reward;
every `metrics_list` entry (`{"name", "value", "type": "Reward" | "Metric"}`) is logged as a
component `reward/<name>/<metric name>/mean`, and so is each entry of a `reward_components` object,
which some AWS samples return instead.

Errors name the handler and the offending id: a handler that raises, a non-200 status, or a score
that is not a finite number is a failed call (`scoring.on_error` applies); results for ids that were
not sent, duplicated or missing ids break the contract and stop the run.

The handler runs in the trainer's process, like a warm Lambda: module state persists between
invocations, and what it prints goes to the trainer's output.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.base import RewardContractError, RewardValues, completion_text, prompt_messages
from rewards.loading import load_function

# Columns that describe the rollout itself rather than the row; they do not go into `metadata`.
_NOT_METADATA = ("prompts", "completions", "completion_ids", "messages", "reference_answer")


class LambdaHandlerError(RuntimeError):
    """The handler failed or answered badly; the message names the handler and the id."""


@dataclass
class LocalLambdaContext:
    """The attributes of AWS Lambda's context object that handlers use."""

    function_name: str
    timeout_s: float
    memory_limit_in_mb: int = 1024
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:local:000000000000:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return f"local/{self.aws_request_id}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


def build_event(
    ids: list[str], prompts: list[Any], completions: list[Any], columns: Mapping[str, list[Any]]
) -> list[dict[str, Any]]:
    """The Bedrock reward event for a batch of rollouts (see the module docstring)."""
    references = columns.get("reference_answer")
    event = []
    for index, rollout_id in enumerate(ids):
        reference = references[index] if references is not None else None
        metadata = {key: values[index] for key, values in columns.items() if key not in _NOT_METADATA}
        metadata["reference_answer"] = reference
        messages = [
            *prompt_messages(prompts[index]),
            {"role": "assistant", "content": completion_text(completions[index])},
        ]
        event.append(
            {"id": rollout_id, "messages": messages, "reference_answer": reference, "metadata": metadata}
        )
    return event


class BedrockLambdaReward:
    """See the module docstring."""

    def __init__(
        self,
        handler: str,
        function_name: str | None = None,
        batch_size: int | None = None,
        timeout_s: float = 900.0,
        memory_limit_in_mb: int = 1024,
    ):
        if ":" not in handler:
            handler = f"{handler}:lambda_handler"
        self.handler_spec = handler
        self.handler = load_function(handler)
        file_or_module = handler.rsplit(":", 1)[0]
        self.function_name = function_name or Path(file_or_module).stem.replace(".", "-")
        self.__name__ = self.function_name
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.memory_limit_in_mb = memory_limit_in_mb
        self._invocations = 0

    def _describe(self) -> str:
        return f"Bedrock Lambda handler {self.handler_spec}"

    def __call__(
        self, completions: list[Any], prompts: list[Any] | None = None, *, trainer_state: Any = None,
        log_extra: Any = None, log_metric: Any = None, **columns: Any,
    ) -> RewardValues:
        # The trainer's context arguments (rft.reward_context) are named so that they stay out of `columns`,
        # every one of which becomes event metadata.
        if prompts is None:
            raise ValueError(f"{self._describe()}: needs `prompts` to build the event's messages")
        count = len(completions)
        size = self.batch_size or max(1, count)
        scores: list[float | None] = [None] * count
        components: dict[str, list[float | None]] = {}
        for start in range(0, count, size):
            stop = min(count, start + size)
            self._invocations += 1
            ids = [f"rollout-{self._invocations}-{i}" for i in range(stop - start)]
            batch_columns = {k: v[start:stop] for k, v in columns.items()}
            event = build_event(ids, prompts[start:stop], completions[start:stop], batch_columns)
            results = self._invoke(event)
            for offset, (score, metrics) in enumerate(self._match(ids, results)):
                scores[start + offset] = score
                for name, value in metrics.items():
                    components.setdefault(name, [None] * count)[start + offset] = value
        return RewardValues(scores, components=components)

    def _invoke(self, event: list[dict[str, Any]]) -> Any:
        try:
            wire_event = json.loads(json.dumps(event))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self._describe()}: a row field cannot be sent as JSON: {exc}") from exc
        context = LocalLambdaContext(self.function_name, self.timeout_s, self.memory_limit_in_mb)
        try:
            result = self.handler(wire_event, context)
        except Exception as exc:
            raise LambdaHandlerError(f"{self._describe()} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, Mapping) and "statusCode" in result:
            if result["statusCode"] != 200:
                raise LambdaHandlerError(
                    f"{self._describe()} returned statusCode {result['statusCode']}: {result.get('body')!r}"
                )
            body = result.get("body")
            try:
                result = json.loads(body) if isinstance(body, str | bytes) else body
            except json.JSONDecodeError as exc:
                raise LambdaHandlerError(f"{self._describe()}: body is not JSON: {exc}") from exc
        try:
            return json.loads(json.dumps(result))
        except (TypeError, ValueError) as exc:
            raise LambdaHandlerError(
                f"{self._describe()}: the result cannot be returned as JSON: {exc}"
            ) from exc

    def _match(self, ids: list[str], results: Any) -> list[tuple[float, dict[str, float]]]:
        if not isinstance(results, list):
            raise RewardContractError(
                f"{self._describe()} returned {type(results).__name__}, expected a list of results"
            )
        by_id: dict[str, tuple[float, dict[str, float]]] = {}
        expected = set(ids)
        for entry in results:
            if not isinstance(entry, Mapping) or "id" not in entry:
                raise RewardContractError(f"{self._describe()} returned an entry without an id: {entry!r}")
            rollout_id = entry["id"]
            if rollout_id not in expected:
                raise RewardContractError(
                    f"{self._describe()} returned id {rollout_id!r}, which was not in the event "
                    f"(sent {ids[0]!r} .. {ids[-1]!r})"
                )
            if rollout_id in by_id:
                raise RewardContractError(f"{self._describe()} returned id {rollout_id!r} twice")
            by_id[rollout_id] = (self._score(entry, rollout_id), self._metrics(entry, rollout_id))
        missing = [rollout_id for rollout_id in ids if rollout_id not in by_id]
        if missing:
            raise RewardContractError(f"{self._describe()} returned no result for id(s) {missing[:5]}")
        return [by_id[rollout_id] for rollout_id in ids]

    def _number(self, value: Any, what: str, rollout_id: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise LambdaHandlerError(
                f"{self._describe()} returned {what} {value!r} for id {rollout_id!r}; expected a finite "
                "number"
            )
        return float(value)

    def _score(self, entry: Mapping[str, Any], rollout_id: str) -> float:
        if "aggregate_reward_score" not in entry:
            raise LambdaHandlerError(
                f"{self._describe()} returned no aggregate_reward_score for id {rollout_id!r}"
            )
        return self._number(entry["aggregate_reward_score"], "aggregate_reward_score", rollout_id)

    def _metrics(self, entry: Mapping[str, Any], rollout_id: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for item in entry.get("metrics_list") or []:
            if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
                raise LambdaHandlerError(
                    f"{self._describe()}: metrics_list entry {item!r} for id {rollout_id!r} needs name and "
                    "value"
                )
            metrics[str(item["name"])] = self._number(item["value"], f"metric {item['name']!r}", rollout_id)
        components = entry.get("reward_components") or {}
        if not isinstance(components, Mapping):
            raise LambdaHandlerError(
                f"{self._describe()}: reward_components for id {rollout_id!r} is not an object"
            )
        for name, value in components.items():
            metrics.setdefault(str(name), self._number(value, f"reward component {name!r}", rollout_id))
        return metrics
