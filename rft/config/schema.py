"""The recipe's reference, printed from the schema itself (`rft config`, `rft train --help-config`).

Every field is documented once, where it is declared; this module only reads those declarations
(pydantic's `model_fields`) and groups them by section, as TRL's `GRPOConfig` docstring groups its
parameters, so the printed reference cannot drift from what the loader accepts.
"""

from __future__ import annotations

import json
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rft.config.recipe import RecipeConfig
from rft.config.sections import ConfigError, Section

# Top-level fields that are values, not sections, are listed under this heading.
TOP_LEVEL = "(recipe)"
DESCRIPTION_WIDTH = 100


@dataclass(frozen=True)
class FieldDoc:
    """One documented field: where it sits, what it holds, its default and its description."""

    section: str
    name: str
    type: str
    default: str
    description: str


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it: `int | None`, `grpo | dapo`, `list[str]`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(choice) for choice in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(part) for part in get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_text(part) for part in get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in YAML (JSON flow style); `required` when there is none."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str)


def _section_model(annotation: Any) -> type[Section] | None:
    """The section class a recipe field holds (itself, or the items of a list of sections)."""
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _doc(section: str, name: str, field: FieldInfo) -> FieldDoc:
    return FieldDoc(section, name, type_text(field.annotation), default_text(field), field.description or "")


def schema_fields(recipe: type[BaseModel] = RecipeConfig) -> list[FieldDoc]:
    """Every field of the recipe, section by section in declaration order, top-level values last."""
    fields: list[FieldDoc] = []
    top_level: list[FieldDoc] = []
    for name, field in recipe.model_fields.items():
        section = _section_model(field.annotation)
        if section is None:
            top_level.append(_doc(TOP_LEVEL, name, field))
            continue
        label = f"{name}[]" if get_origin(field.annotation) is list else name
        fields.extend(_doc(label, field_name, item) for field_name, item in section.model_fields.items())
    return fields + top_level


def section_heading(recipe: type[BaseModel], section: str) -> str:
    """A section's name and its class's docstring (what the section is for)."""
    field = recipe.model_fields.get(section.removesuffix("[]"))
    model = _section_model(field.annotation) if field is not None else None
    summary = (model.__doc__ or "").strip().splitlines()[0] if model is not None and model.__doc__ else ""
    return f"{section}: {summary}" if summary else section


def format_schema(fields: list[FieldDoc], recipe: type[BaseModel] = RecipeConfig,
                  sections: list[str] | None = None) -> str:
    """The reference as text: a heading per section, then each field's type, default and description.

    `sections` keeps only those (`algorithm`, `rewards`); an unknown one is a `ConfigError` listing them.
    """
    known = list(dict.fromkeys(doc.section for doc in fields))
    wanted = known
    if sections:
        by_name = {name.removesuffix("[]"): name for name in known}
        unknown = [name for name in sections if name.removesuffix("[]") not in by_name]
        if unknown:
            raise ConfigError(f"no recipe section {', '.join(unknown)}; sections: {', '.join(by_name)}")
        wanted = [by_name[name.removesuffix("[]")] for name in sections]
    out: list[str] = []
    for section in wanted:
        out.append(section_heading(recipe, section))
        for doc in (doc for doc in fields if doc.section == section):
            out.append(f"  {doc.name}: {doc.type} = {doc.default}")
            out.extend(textwrap.wrap(doc.description, DESCRIPTION_WIDTH, initial_indent="      ",
                                     subsequent_indent="      ", break_on_hyphens=False))
        out.append("")
    return "\n".join(out).rstrip() + "\n"
