"""`rft config` / `rft train --help-config`: the recipe reference printed from the declarations."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest

from rft.cli import main, resume_target
from rft.config import ConfigError, RecipeConfig, format_schema, schema_fields
from rft.config.schema import type_text


def test_every_field_is_listed_once_under_its_section_with_a_description() -> None:
    fields = schema_fields()
    sections = list(dict.fromkeys(doc.section for doc in fields))
    assert sections == ["model", "lora", "data", "rewards[]", "scoring", "algorithm", "rollout", "training",
                        "output", "eval", "monitors", "(recipe)"]
    assert len({(doc.section, doc.name) for doc in fields}) == len(fields)
    undocumented = [f"{doc.section}.{doc.name}" for doc in fields if not doc.description]
    assert not undocumented
    eps_high = next(doc for doc in fields if (doc.section, doc.name) == ("algorithm", "eps_high"))
    assert (eps_high.type, eps_high.default) == ("float", "0.2")
    assert "DAPO: 0.28" in eps_high.description
    train = next(doc for doc in fields if (doc.section, doc.name) == ("data", "train"))
    assert train.default == "required"


def test_types_read_as_a_recipe_author_writes_them() -> None:
    assert type_text(int | None) == "int | None"
    assert type_text(Literal["grpo", "dapo"]) == "grpo | dapo"
    assert type_text(list[str]) == "list[str]"
    assert type_text(dict[str, int]) == "dict[str, int]"


def test_format_groups_fields_by_section_and_filters_sections() -> None:
    text = format_schema(schema_fields(), sections=["algorithm"])
    lines = text.splitlines()
    assert lines[0].startswith("algorithm: ")
    assert '  preset: grpo | dapo | gspo | dr_grpo | None = null' in lines
    assert not any(line.startswith("rollout") for line in lines)
    assert all(len(line) <= 110 for line in format_schema(schema_fields(), RecipeConfig).splitlines()
               if line.startswith("      "))
    with pytest.raises(ConfigError, match="no recipe section nope; sections: model, lora"):
        format_schema(schema_fields(), sections=["nope"])


def test_rft_config_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "rewards"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("rewards[]: ") and "  fn: str = required" in printed
    assert main(["config", "nope"]) == 2
    assert "error: no recipe section nope" in capsys.readouterr().err


def test_train_help_config_needs_no_recipe() -> None:
    result = subprocess.run([sys.executable, "-m", "rft.cli", "train", "--help-config"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: ") and "  eps_high: float = 0.2" in result.stdout


def test_resume_option_as_the_trainer_takes_it() -> None:
    assert resume_target("latest") is True
    assert resume_target(None) is None
    assert resume_target("runs/x/checkpoints/step_4") == "runs/x/checkpoints/step_4"
