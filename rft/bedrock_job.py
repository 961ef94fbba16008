"""A Bedrock RFT job's settings (`RFTHyperParameters`) as a recipe.

The file is what `CreateModelCustomizationJob` takes, at any depth: the whole request
(`{"customizationConfig": {"rftConfig": {"hyperParameters": {...}}}}`), `{"rftConfig": ...}`,
`{"hyperParameters": {...}}`, or the bare mapping. Ranges are botocore's bedrock service model
(2023-04-20). Each setting replaces one recipe field (README, "Bedrock job settings"):

| Bedrock                   | recipe                                                          |
|---------------------------|-----------------------------------------------------------------|
| `batchSize`               | `training.prompts_per_step` (prompts per step)                  |
| `trainingSamplePerPrompt` | `rollout.group_size`                                            |
| `epochCount`              | `training.steps` = ceil(epochCount x training rows / batchSize) |
| `learningRate`            | `training.learning_rate`                                        |
| `evalInterval`            | `eval.every` (steps)                                            |
| `inferenceMaxTokens`      | `rollout.max_new_tokens`                                        |
| `maxPromptLength`         | `data.max_prompt_length`                                        |
| `reasoningEffort`         | `data.chat_template_kwargs`: REASONING_EFFORT below             |
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rft.config import ConfigError, RecipeConfig, format_errors

logger = logging.getLogger(__name__)

# name: (type, minimum, maximum); None where Bedrock documents no bound.
RANGES: dict[str, tuple[type, float | None, float | None]] = {
    "epochCount": (int, 1, 50),
    "batchSize": (int, 16, 512),
    "learningRate": (float, 1e-7, 1e-3),
    "trainingSamplePerPrompt": (int, 2, 16),
    "evalInterval": (int, 1, 100),
    "inferenceMaxTokens": (int, 1, None),
    "maxPromptLength": (int, 1, None),
}
# Templates read the variable they know and ignore the other: Qwen3 (and the Qwen3-style templates)
# `enable_thinking`, gpt-oss `reasoning_effort`. Low effort is the one that turns thinking off.
REASONING_EFFORT: dict[str, dict[str, Any]] = {
    "low": {"enable_thinking": False, "reasoning_effort": "low"},
    "medium": {"enable_thinking": True, "reasoning_effort": "medium"},
    "high": {"enable_thinking": True, "reasoning_effort": "high"},
}
# The file as given, beside config.yaml in the run directory.
BEDROCK_HYPERPARAMETERS_NAME = "bedrock_hyperparameters.json"
# Bedrock RFT's dataset bounds; outside them the job would be refused there, here it only warns.
BEDROCK_MIN_ROWS = 100
BEDROCK_MAX_ROWS = 20_000


def read_hyperparameters(path: str) -> dict[str, Any]:
    """The `hyperParameters` mapping of a Bedrock request file, each value checked against Bedrock's range."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: Bedrock hyperparameters file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    prefix = ""
    for key in ("customizationConfig", "rftConfig", "hyperParameters"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload, prefix = payload[key], f"{prefix}{key}."
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a JSON object of Bedrock RFT hyperparameters")
    known = [*RANGES, "reasoningEffort"]
    for name, value in payload.items():
        where = f"{path}: {prefix}{name}"
        if name not in known:
            raise ConfigError(f"{where}: not a Bedrock RFT hyperparameter (known: {', '.join(known)})")
        if name == "reasoningEffort":
            if value not in REASONING_EFFORT:
                raise ConfigError(f"{where}: got {value!r}; Bedrock allows {', '.join(REASONING_EFFORT)}")
            continue
        kind, low, high = RANGES[name]
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or (kind is int and value != int(value)):
            raise ConfigError(f"{where}: got {value!r}; expected "
                              f"{'an integer' if kind is int else 'a number'}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise ConfigError(f"{where}: {value:g} is outside Bedrock's range {bounds}")
    return payload


def apply_bedrock_hyperparameters(config: RecipeConfig, path: str) -> RecipeConfig:
    """The recipe with the file's settings in place of its own (a new, validated config)."""
    from rft.data import count_train_rows

    settings = read_hyperparameters(path)
    raw = config.model_dump(mode="python")
    fields = {
        "batchSize": ("training", "prompts_per_step"), "trainingSamplePerPrompt": ("rollout", "group_size"),
        "learningRate": ("training", "learning_rate"), "evalInterval": ("eval", "every"),
        "inferenceMaxTokens": ("rollout", "max_new_tokens"), "maxPromptLength": ("data", "max_prompt_length"),
    }
    for name, (section, field) in fields.items():
        if name in settings:
            raw[section][field] = settings[name]
    if "reasoningEffort" in settings:
        raw["data"]["chat_template_kwargs"] = {**raw["data"]["chat_template_kwargs"],
                                               **REASONING_EFFORT[settings["reasoningEffort"]]}
    rows = count_train_rows(config.data)
    if not BEDROCK_MIN_ROWS <= rows <= BEDROCK_MAX_ROWS:
        logger.warning("%s: %d training rows, outside Bedrock RFT's %d to %d (Bedrock would refuse this job)",
                       config.data.train, rows, BEDROCK_MIN_ROWS, BEDROCK_MAX_ROWS)
    if "epochCount" in settings:
        steps = settings["epochCount"] * rows / raw["training"]["prompts_per_step"]
        raw["training"]["steps"] = max(1, math.ceil(steps))
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, f"{path} (applied over the recipe)")) from None
