"""Reading a recipe: YAML, `--set` overrides, validation errors naming file and field, relative paths."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rft.config.recipe import RecipeConfig
from rft.config.sections import ConfigError
from rft.field_names import unknown_field_hint

logger = logging.getLogger(__name__)

def format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(recipe)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = unknown_field_hint(item["loc"], item.get("input"), RecipeConfig)
        if item["type"] == "literal_error":
            message = f"got {item['input']!r}; {message}"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def _parse_value(text: str, override: str) -> Any:
    # YAML gives the natural typing for CLI overrides: 0.28 -> float, true -> bool, [a, b] -> list.
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {override!r}: the value is not valid YAML ({problem}); quote it as a string"
        ) from None


def _list_index(items: list, part: str, override: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"--set {override!r}: {part!r} is not a position in a list of {len(items)} (use 0 "
                          f"to {len(items) - 1})")
    index = int(part)
    if not -len(items) <= index < len(items):
        raise ConfigError(f"--set {override!r}: position {index} is past the end of a list of {len(items)} "
                          f"(use 0 to {len(items) - 1})")
    return index


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw recipe dict."""
    result = copy.deepcopy(raw)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected key=value, e.g. algorithm.eps_high=0.28")
        key, value = override.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(node, part, override)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {override!r}: {part} is not a section")
        if isinstance(node, list):
            node[_list_index(node, parts[-1], override)] = _parse_value(value, override)
        else:
            node[parts[-1]] = _parse_value(value, override)
    return result


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, raw: dict | None = None,
    bedrock_hyperparameters: str | None = None,
) -> RecipeConfig:
    """Load a recipe from YAML (or a dict), apply `--set` overrides, validate.

    Relative data, model and reward paths are resolved against the recipe's folder first, then the
    current directory, and recorded as absolute paths, so recipes work from anywhere.
    `bedrock_hyperparameters` (or the recipe's field of that name): a Bedrock job's settings file,
    applied over the recipe (rft/bedrock_job.py).
    """
    source = str(path) if path is not None else "<recipe>"
    if raw is None:
        if path is None:
            raise ConfigError("no recipe given")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"{source}: recipe file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None
    if path is not None:
        _resolve_paths(config, Path(path).resolve().parent)
    if bedrock_hyperparameters is not None:
        config.bedrock_hyperparameters = str(Path(bedrock_hyperparameters).resolve())
    if config.bedrock_hyperparameters is not None:
        # Imported here: it reads the data through rft.data, which imports this module.
        from rft.bedrock_job import apply_bedrock_hyperparameters

        config = apply_bedrock_hyperparameters(config, config.bedrock_hyperparameters)
    return config


def _resolve_against(value: str, base: Path, *, working_dir: bool = True) -> str:
    """A relative path that exists in the recipe's folder, else (`working_dir`) in the current one, absolute.

    The recipe's folder wins, so a file of the same name where the command happens to run cannot
    replace the recipe's own; anything found nowhere (a hub id, a module, a column name) is left as is.
    """
    path = Path(value)
    if path.is_absolute() or not value:
        return value
    in_recipe = base / path
    if in_recipe.exists():
        if working_dir and path.exists() and path.resolve() != in_recipe.resolve():
            logger.warning("%s: using the recipe folder's %s, not the one in the current directory",
                           value, in_recipe)
        return str(in_recipe.resolve())
    if working_dir and path.exists():
        return str(path.resolve())
    return value


def _resolve_paths(config: RecipeConfig, base: Path) -> None:
    config.data.train = _resolve_against(config.data.train, base)
    if config.bedrock_hyperparameters:
        config.bedrock_hyperparameters = _resolve_against(config.bedrock_hyperparameters, base)
    if config.data.eval:
        config.data.eval = _resolve_against(config.data.eval, base)
    if not config.model.name_or_path.startswith("embedded:"):
        config.model.name_or_path = _resolve_against(config.model.name_or_path, base)
    if config.environment is not None:
        config.environment = _resolve_spec(config.environment, base)
    config.tools = [_resolve_spec(spec, base) for spec in config.tools]
    for reward in [*config.rewards, *config.eval.metrics]:
        reward.fn = _resolve_spec(reward.fn, base)
        # Handler files, schema files and the like in kwargs are relative to the recipe; only there, and only
        # what looks like a file (a folder or a suffix), so a column name never turns into a path.
        reward.kwargs = {
            key: _resolve_spec(value, base, working_dir=False) if _looks_like_file(value) else value
            for key, value in reward.kwargs.items()
        }
        if reward.build is not None:
            reward.build = {
                key: _resolve_spec(value, base, working_dir=False) if _looks_like_file(value) else value
                for key, value in reward.build.items()
            }


def _looks_like_file(value: Any) -> bool:
    return isinstance(value, str) and ("/" in value or bool(Path(value.split(":", 1)[0]).suffix))


def _resolve_spec(value: str, base: Path, *, working_dir: bool = True) -> str:
    """`file.py:name` (its file resolved) or a plain path, as `_resolve_against` does."""
    if ":" in value and value.rsplit(":", 1)[0].endswith(".py"):
        file, name = value.rsplit(":", 1)
        return f"{_resolve_against(file, base, working_dir=working_dir)}:{name}"
    return _resolve_against(value, base, working_dir=working_dir)


