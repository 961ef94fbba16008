"""Every recipe in recipes/ stays runnable: it validates, names its hardware and time, and trains one step
with the model swapped for a tiny one of the same family (and hub data for the local copy)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rft.config import load_config
from rft.trainer import Trainer
from tests.conftest import REPO, build_tiny_model

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
GSM8K = REPO / "tests" / "data" / "gsm8k"
# Hub data sets the recipes name, and their local copies (CI has no hub).
LOCAL_COPIES = {
    ("hf:openai/gsm8k:main", "train"): GSM8K / "train.jsonl",
    ("hf:openai/gsm8k:main", "test"): GSM8K / "test.jsonl",
}


def _reward_specs(rewards: list[dict[str, Any]]) -> list[str]:
    """Every function a recipe's rewards name, rubric components included."""
    specs = []
    for reward in rewards:
        specs.append(reward["fn"])
        specs.extend(_reward_specs((reward.get("kwargs") or {}).get("components", [])))
    return specs


def _missing_reward_modules(recipe: Path) -> list[str]:
    missing = []
    for spec in _reward_specs(yaml.safe_load(recipe.read_text())["rewards"]):
        target = spec.rsplit(":", 1)[0]
        if target.endswith(".py"):
            if not (recipe.parent / target).exists() and not Path(target).exists():
                missing.append(target)
        elif importlib.util.find_spec(target) is None:
            missing.append(target)
    return missing


def _header(recipe: Path) -> str:
    lines = recipe.read_text().splitlines()
    return "\n".join(
        line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_validates_and_states_hardware_and_time(recipe: Path) -> None:
    config = load_config(recipe)
    header = _header(recipe)
    assert re.search(r"\b(GPU|CPU)s?\b", header), f"{recipe.name}: the header comment names no hardware"
    assert re.search(
        r"\b\d+(\.\d+)?\s*(h|min)\b|minutes|hours", header
    ), f"{recipe.name}: the header names no time"
    for source in (config.data.train, config.data.eval):
        if source and source.startswith("hf:"):
            assert (
                source, "train"
            ) in LOCAL_COPIES, f"{recipe.name}: {source} has no local copy for this test"


@pytest.mark.parametrize("accelerate_config", ACCELERATE_CONFIGS, ids=lambda path: path.stem)
def test_accelerate_config_loads(accelerate_config: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(accelerate_config))
    assert loaded.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    if loaded.distributed_type.value == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2
    if loaded.distributed_type.value == "DEEPSPEED":
        assert loaded.deepspeed_config["zero_stage"] == 3
        assert loaded.deepspeed_config["gradient_accumulation_steps"] == 1


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), embedded_model_dir, architecture="qwen2")


def _shrunk_overrides(recipe: Path, model_dir: Path, run_dir: Path) -> list[str]:
    """What changes for CI: the model, the engine, the sizes, the hub data. Algorithm and rewards stay."""
    raw = yaml.safe_load(recipe.read_text())
    data = raw["data"]
    overrides = [
        f"model.name_or_path={model_dir}", "model.dtype=float32",
        "rollout.engine=transformers", "rollout.max_new_tokens=8",
        "training.steps=1", "training.prompts_per_step=2", "training.threads=1",
        "data.max_train_rows=16", "data.max_eval_rows=2",
        "eval.before_training=false", "eval.after_training=false", "eval.every=0",
        f"output.run_dir={run_dir}", "output.save_every=1",
    ]
    for field, split_field, default_split in (
        ("train", "train_split", "train"), ("eval", "eval_split", "test")
    ):
        source = data.get(field)
        if source and source.startswith("hf:"):
            overrides.append(f"data.{field}={LOCAL_COPIES[(source, data.get(split_field, default_split))]}")
    return overrides


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_trains_one_step_on_a_tiny_model(recipe: Path, tiny_qwen_dir: Path, tmp_path: Path) -> None:
    missing = _missing_reward_modules(recipe)
    if missing:
        pytest.skip(f"reward modules not in this tree yet: {missing}")
    run_dir = tmp_path / "run"
    config = load_config(recipe, _shrunk_overrides(recipe, tiny_qwen_dir, run_dir))
    original = load_config(recipe)
    assert config.algorithm == original.algorithm and config.rewards == original.rewards
    Trainer(config).train()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert "reward/mean" in metrics[0]
    assert (run_dir / "checkpoints" / "step-000001").is_dir()
    assert (run_dir / "final").is_dir()
