"""Load reward functions by spec (`path/to/file.py:function` or `package.module:function`) and bind their kwargs.

Torch-free on purpose: reward worker processes (`rft.reward_workers`) import this and nothing heavier.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
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
                raise RewardError(f"reward {spec!r}: importing {target} raised {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RewardError(f"reward {spec!r}: cannot import {target}: {exc}") from exc
    if not hasattr(module, name):
        raise RewardError(f"reward {spec!r}: {target} has no function {name!r}")
    return getattr(module, name)


def build_reward(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[str, RewardFunction]:
    """Load a reward and bind its kwargs: (default name, callable)."""
    target = load_function(spec)
    kwargs = kwargs or {}
    if inspect.isclass(target):
        try:
            instance = target(**kwargs)
        except (TypeError, ValueError, KeyError, OSError) as exc:
            raise RewardError(f"reward {spec!r}: {exc}") from exc
        return getattr(instance, "__name__", target.__name__), instance
    if not callable(target):
        raise RewardError(f"reward {spec!r}: {type(target).__name__} is not callable")
    name = getattr(target, "__name__", spec.rsplit(":", 1)[1])
    if kwargs:
        # Named parameters only: a reward's **kwargs also catches the dataset columns, so a misspelt
        # recipe kwarg would otherwise vanish into it without a word.
        parameters = inspect.signature(target).parameters
        named = [p for p, v in parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(named))
        if unknown:
            raise RewardError(f"reward {spec!r}: unknown kwargs {unknown}; {name} takes {named}")
        target = functools.partial(target, **kwargs)
    return name, target


def declared_columns(spec: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """The dataset columns a reward says it reads: its `*_column` parameters, recipe kwargs over defaults.

    The library's rewards name their inputs this way (`answer_column`, `tests_column`, ...), so a
    missing column is found from the recipe and the rows alone, before any model loads.
    """
    target = load_function(spec)
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing declared
        parameters = {}
    columns = {name: p.default for name, p in parameters.items() if name.endswith("_column")}
    columns.update({name: value for name, value in kwargs.items() if name.endswith("_column")})
    return {name: value for name, value in columns.items() if isinstance(value, str)}
