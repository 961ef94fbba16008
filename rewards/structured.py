"""Structured output: JSON validity and JSON Schema compliance (`jsonschema`).

Recipe::

    rewards:
      - fn: rewards.structured:json_valid
      - fn: rewards.structured:JsonSchemaReward
        kwargs:
          schema: {type: object, required: [name, amount],
                   properties: {name: {type: string}, amount: {type: number}}}
          # or schema_file: schemas/invoice.json, or schema_column: schema (one schema per row)
          forbid_extra: true    # objects may hold no keys beyond `properties`

The JSON is taken from the completion as a whole, else from its last ```json fenced block, else
from the first `{` or `[` that starts a complete JSON value (`extract: auto`); `extract: strict`
accepts only a completion that is JSON and nothing else.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema

from rewards.base import RewardValues, column, completion_text

_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_DECODER = json.JSONDecoder()


class NoJSON(ValueError):
    """The completion holds no JSON value."""


def extract_json(text: str, extract: str = "auto") -> Any:
    """The JSON value in a completion (see the module docstring); raises NoJSON."""
    if extract not in ("auto", "strict"):
        raise ValueError(f"extract {extract!r}; use auto or strict")
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        if extract == "strict":
            raise NoJSON("the completion is not JSON") from None
    fenced = _FENCE.findall(text)
    if fenced:
        try:
            return json.loads(fenced[-1])
        except json.JSONDecodeError:
            pass
    for start, char in enumerate(text):
        if char in "{[":
            try:
                value, _ = _DECODER.raw_decode(text, start)
                return value
            except json.JSONDecodeError:
                continue
    raise NoJSON("no JSON value found in the completion")


def json_valid(completions: list[Any], *, extract: str = "auto", **columns: Any) -> list[float]:
    """1.0 when the completion holds a JSON object or array, else 0.0."""
    scores = []
    for completion in completions:
        try:
            value = extract_json(completion_text(completion), extract)
        except NoJSON:
            scores.append(0.0)
            continue
        scores.append(1.0 if isinstance(value, dict | list) else 0.0)
    return scores


json_valid.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` where every object schema with `properties` and no `additionalProperties`
    forbids extra keys, recursively (properties, items, combinators, $defs)."""
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed and "patternProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


class JsonSchemaReward:
    """1.0 when the completion's JSON validates against the schema, else 0.0 (unparseable JSON too).

    Component logged: `parsed` (the JSON could be read); counter: `schema_errors`
    (validation errors found over the batch). The validator is built once per schema.
    """

    reward_range = (0.0, 1.0)

    def __init__(
        self,
        schema: dict[str, Any] | None = None,
        schema_file: str | None = None,
        schema_column: str | None = None,
        forbid_extra: bool = True,
        extract: str = "auto",
    ):
        if sum(x is not None for x in (schema, schema_file, schema_column)) != 1:
            raise ValueError("JsonSchemaReward: give exactly one of schema, schema_file, schema_column")
        if schema_file is not None:
            try:
                schema = json.loads(Path(schema_file).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"JsonSchemaReward: schema_file {schema_file}: {exc}") from exc
        self.__name__ = "json_schema"
        self.schema_column = schema_column
        self.forbid_extra = forbid_extra
        self.extract = extract
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self.validator = self._validator(schema) if schema is not None else None

    def _validator(self, schema: Any) -> jsonschema.protocols.Validator:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._validators:
            if self.forbid_extra:
                schema = closed_schema(copy.deepcopy(schema))
            validator_class = jsonschema.validators.validator_for(schema)
            try:
                validator_class.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"JsonSchemaReward: invalid schema: {exc.message}") from exc
            self._validators[key] = validator_class(schema)
        return self._validators[key]

    def __call__(self, completions: list[Any], **columns: Any) -> RewardValues:
        if self.schema_column is not None:
            schemas = column(columns, self.schema_column, len(completions), "json_schema")
            validators = [self._validator(json.loads(s) if isinstance(s, str) else s) for s in schemas]
        else:
            assert self.validator is not None
            validators = [self.validator] * len(completions)
        scores: list[float | None] = []
        parsed: list[float | None] = []
        errors = 0
        for completion, validator in zip(completions, validators, strict=True):
            try:
                value = extract_json(completion_text(completion), self.extract)
            except NoJSON:
                scores.append(0.0)
                parsed.append(0.0)
                continue
            parsed.append(1.0)
            found = sum(1 for _ in validator.iter_errors(value))
            errors += found
            scores.append(0.0 if found else 1.0)
        return RewardValues(scores, components={"parsed": parsed}, counters={"schema_errors": errors})
