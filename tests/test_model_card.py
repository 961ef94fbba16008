"""What travels with final/: the base model's identity as the recipe gave it, and a model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rft.config import load_config
from rft.model_card import CARD_NAME, EMBEDDED_ORIGIN, record_base_model, write_model_card
from rft.trainer import Trainer
from tests.conftest import tiny_recipe


def test_final_names_the_recipes_base_and_carries_a_card(tiny_model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 2}, output={"report": False},
                         eval={"before_training": True, "after_training": True})
    config = load_config(raw=recipe)
    results = Trainer(config).train()
    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
    card = (final / CARD_NAME).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {
        "base_model": str(tiny_model_dir), "library_name": "peft",
        "tags": ["rft", "reinforcement-learning", "grpo"],
    }
    assert f"| base model | {results['before']['mean']:.3f} | {results['before']['stderr']:.3f} | 8 |" in card
    assert f"| trained | {results['after']['mean']:.3f} |" in card
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["train"]["sha256"][:16] in card
    # The adapter loads elsewhere from what it names, with plain peft.
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(final)


def test_the_embedded_base_is_named_and_explained(tmp_path: Path) -> None:
    config = load_config(raw={"data": {"train": "x.jsonl"}, "rewards": [{"fn": "rewards.maths:math_answer"}]})
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/root/.cache/rft/smollm2"})
    )
    record_base_model(tmp_path, config)
    assert json.loads(
        (tmp_path / "adapter_config.json").read_text()
    )["base_model_name_or_path"] == config.model.name_or_path
    card = write_model_card(tmp_path, config, None, {}).read_text()
    assert EMBEDDED_ORIGIN in card and "Not evaluated in this run." in card
