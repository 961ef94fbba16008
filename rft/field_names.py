"""Hints for unknown recipe fields: the nearest field, and where TRL's GRPOConfig names live here.

Users come with TRL's names (`epsilon_high`, `num_generations`, `loss_type`, ...). They are not
accepted as aliases, because several do not map one to one (TRL's `epsilon` sets both clip bounds,
`loss_type` and `scale_rewards` take other values): an unknown field instead gets a hint naming the
rft field and, where the value given maps, the value to write there.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

# TRL GRPOConfig loss_type -> rft algorithm.loss_agg. BNPO normalises by the tokens of the (local) batch,
# which rft's token-mean does over the global batch: the nearest.
_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "bnpo": "token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}
# TRL GRPOConfig scale_rewards -> rft algorithm.scale (TRL's True is "group", False is "none").
_SCALES = {"group": "group", "batch": "batch", "none": "none", True: "group", False: "none"}


def _mapped(table: dict[Any, str]) -> Any:
    def value_hint(value: Any) -> str | None:
        key = value.lower() if isinstance(value, str) else value
        return table.get(key) if isinstance(key, str | bool) else None
    return value_hint


# TRL name -> (rft field, how a TRL value maps, or None where it is the same, and a note).
TRL_NAMES: dict[str, tuple[str, Any, str]] = {
    "epsilon": ("algorithm.eps_low", None, "it is both clip bounds: set algorithm.eps_low and "
                                           "algorithm.eps_high"),
    "epsilon_high": ("algorithm.eps_high", None, ""),
    "num_generations": ("rollout.group_size", None, ""),
    "max_completion_length": ("rollout.max_new_tokens", None, ""),
    "max_prompt_length": ("data.max_prompt_length", None, ""),
    "loss_type": ("algorithm.loss_agg", _mapped(_LOSS_TYPES),
                  "grpo -> seq-mean-token-mean, dapo/bnpo -> token-mean, dr_grpo -> seq-mean-token-sum-norm, "
                  "and Dr. GRPO also sets algorithm.advantage: dr_grpo, scale: none"),
    "beta": ("algorithm.beta", None, ""),
    "importance_sampling_level": ("algorithm.importance_sampling_level", None, ""),
    "scale_rewards": ("algorithm.scale", _mapped(_SCALES), "group/true -> group, batch -> batch, none/false "
                                                           "-> none"),
    "num_iterations": ("algorithm.num_iterations", None, ""),
    "top_entropy_quantile": ("algorithm.top_entropy_quantile", None, ""),
    "mask_truncated_completions": ("algorithm.mask_truncated", None, ""),
    "learning_rate": ("training.learning_rate", None, ""),
    "max_steps": ("training.steps", None, ""),
    "temperature": ("rollout.temperature", None, ""),
}


def unknown_field_hint(loc: Sequence[Any], value: Any, root: type[BaseModel]) -> str:
    """The message for an unknown field at `loc` (given `value`): TRL's name, else the nearest field."""
    path = ".".join(str(part) for part in loc)
    name = str(loc[-1])
    if name in TRL_NAMES:
        target, value_hint, note = TRL_NAMES[name]
        if target != path:  # the same path: a field this version lacks, and no better hint to give
            mapped = value_hint(value) if value_hint is not None else None
            wanted = f"{target}: {mapped}" if mapped is not None else target
            return f"unknown field; did you mean {wanted}? (TRL's {name}{'; ' + note if note else ''})"
    siblings = _fields(root, loc[:-1])
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    prefix = path[: len(path) - len(name)]
    if close:
        return f"unknown field; did you mean {prefix}{close[0]}?"
    elsewhere = [f"{section}.{name}" for section, model in _sections(root) if name in model.model_fields]
    if elsewhere:
        return f"unknown field here; did you mean {' or '.join(elsewhere)}?"
    return "unknown field (misspelt?)"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, or the item of a list, or the non-None member of an optional."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            model = _model_of(argument)
            if model is not None:
                return model
        return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields(root: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):  # a position in a list: the list's item model is already `model`
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _sections(root: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """The root's sections that are one model (not lists of them, whose fields need a position)."""
    return [
        (name, field.annotation) for name, field in root.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]
