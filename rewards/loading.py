"""Load reward functions by spec (`path/to/file.py:function` or `package.module:function`), build them
(factories) and bind their kwargs.

The trainer reaches this through its one door, `rft.reward_loading`; plugins that hold other rewards
(`rewards.rubric`, `rewards.bedrock_lambda`) import it directly. Torch-free on purpose: reward worker
processes (`rft.reward_workers`) import this and nothing heavier.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RewardFunction = Callable[..., Any]


class RewardError(RuntimeError):
    """A reward function failed in a way the run cannot continue from."""


def load_function(spec: str) -> Callable[..., Any]:
    """Import `path/to/file.py:function` or `package.module:function` (a function or a class)."""
    if ":" not in spec:
        raise RewardError(f"reward {spec!r}: expected 'file.py:function' or 'package.module:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {target} not found")
        # One module per file path and content: two rewards from one file share its state, as an
        # import would, and a file rewritten in the same process is loaded afresh.
        digest = hashlib.sha256(f"{path.resolve()}\0".encode() + path.read_bytes()).hexdigest()[:16]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"rft_reward_{stem}_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise RewardError(
                    f"reward {spec!r}: importing {target} raised {type(exc).__name__}: {exc}"
                ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RewardError(f"reward {spec!r}: cannot import {target}: {exc}") from exc
    if not hasattr(module, name):
        raise RewardError(f"reward {spec!r}: {target} has no function {name!r}")
    return getattr(module, name)


def build_reward(
    spec: str, kwargs: dict[str, Any] | None = None, build: dict[str, Any] | None = None
) -> tuple[str, RewardFunction]:
    """Load a reward: (default name, callable).

    `build`: `spec` names a factory (TRL's `get_cosine_scaled_reward`, `get_soft_overlong_punishment`),
    called once with these; what it returns is the reward. `kwargs`: bound to the reward itself
    (functools.partial), or, when `spec` names a class, given to its constructor.
    """
    target = load_function(spec)
    kwargs = kwargs or {}
    if build is not None:
        target = _built(spec, target, build)
    elif inspect.isclass(target):
        try:
            instance = target(**kwargs)
        except (TypeError, ValueError, KeyError, OSError) as exc:
            raise RewardError(f"reward {spec!r}: {exc}") from exc
        return getattr(instance, "__name__", target.__name__), instance
    if not callable(target):
        raise RewardError(f"reward {spec!r}: {type(target).__name__} is not callable")
    name = getattr(target, "__name__", spec.rsplit(":", 1)[1])
    parameters = _parameters(target)
    if parameters is not None and build is None and not _takes_completions(parameters):
        named = [p for p, v in parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        raise RewardError(
            f"reward {spec!r}: {name}({', '.join(named)}) takes no `completions`, so it is no reward; "
            "if it builds one (a factory, like TRL's get_cosine_scaled_reward), give its arguments under "
            "`build:` instead of `kwargs:`"
        )
    if kwargs:
        # Named parameters only: a reward's **kwargs also catches the dataset columns, so a misspelt
        # recipe kwarg would otherwise vanish into it without a word.
        named = [
            p for p, v in (parameters or {}).items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)
        ]
        unknown = sorted(set(kwargs) - set(named))
        if unknown:
            raise RewardError(f"reward {spec!r}: unknown kwargs {unknown}; {name} takes {named}")
        target = functools.partial(target, **kwargs)
    return name, target


def _built(spec: str, factory: Any, build: dict[str, Any]) -> RewardFunction:
    """The reward a factory returns for `build`."""
    if not callable(factory):
        raise RewardError(f"reward {spec!r}: build: {type(factory).__name__} is not callable")
    try:
        reward = factory(**build)
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise RewardError(f"reward {spec!r}: build: {exc}") from exc
    if not callable(reward):
        raise RewardError(
            f"reward {spec!r}: build: it returned {type(reward).__name__}, not a reward function; "
            "to bind arguments to the reward itself use `kwargs:`"
        )
    return reward


def _parameters(function: Any) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return None


def _takes_completions(parameters: Mapping[str, inspect.Parameter]) -> bool:
    """Whether a call with `completions=` (and the other columns, by keyword) can bind."""
    return "completions" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def declared_columns(
    spec: str, kwargs: dict[str, Any], build: dict[str, Any] | None = None
) -> dict[str, str]:
    """The dataset columns a reward says it reads: its `*_column` parameters, recipe kwargs over defaults.

    The library's rewards name their inputs this way (`answer_column`, `tests_column`, ...), so a
    missing column is found from the recipe and the rows alone, before any model loads. For a
    factory (`build`) the parameters read are those of the reward it builds.
    """
    target = load_function(spec) if build is None else _built(spec, load_function(spec), build)
    parameters = _parameters(target) or {}
    columns = {name: p.default for name, p in parameters.items() if name.endswith("_column")}
    columns.update({name: value for name, value in kwargs.items() if name.endswith("_column")})
    return {name: value for name, value in columns.items() if isinstance(value, str)}
